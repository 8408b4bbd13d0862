//! The shared runtime (`ohx_common::kafka::run_stage`) against the real broker (tansu):
//! rebalances with members joining and leaving mid-stream lose nothing, a shutdown during a
//! retry commits nothing, a retried batch sees the state it saw the first time, commits never
//! pass the processor's commit point, undecodable records are dead-lettered, a schema registry
//! answering 404 for a moment is retried while one that never had a schema id is given up on
//! after the bound, the partitions of a member killed without leaving are taken over, outputs
//! carry their input's trace, and a service whose port is taken exits with the reason.

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ohx_common::admin::Health;
use ohx_common::codec::Codec;
use ohx_common::kafka::inspect::read_topic;
use ohx_common::kafka::{
    Emitter, Input, KafkaSettings, OutRecord, Processor, Producer, StageError, StageSettings,
    run_stage,
};
use ohx_common::records::{Context, DeadLetter, SyncRequest, topic};
use ohx_common::trace::Trace;
use ohx_tests::kafka_util::{group_lag, produce_raw, read_all};
use ohx_tests::stack::spawn_tansu;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const IN: &str = "rt.in";
const OUT: &str = "rt.out";
const PARTITIONS: i32 = 4;

struct Broker {
    _dir: tempdir::Dir,
    _child: tokio::process::Child,
    addr: String,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn broker(name: &str) -> anyhow::Result<Broker> {
    let dir = std::env::temp_dir().join(format!("ohx-rt-{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let (child, addr) = spawn_tansu(&dir, "tansu").await?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &addr)
        .set("broker.address.family", "v4")
        .create()?;
    let topics = [
        NewTopic::new(IN, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(OUT, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(topic::DEAD_LETTER, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
        if let Err((t, e)) = r {
            anyhow::bail!("cannot create {t}: {e}");
        }
    }
    Ok(Broker {
        _dir: tempdir::Dir(dir),
        _child: child,
        addr,
    })
}

fn kafka(addr: &str) -> KafkaSettings {
    KafkaSettings {
        bootstrap: addr.to_string(),
        extra: vec![],
    }
}

fn producer(addr: &str) -> anyhow::Result<Producer> {
    producer_with(addr, Codec::embedded()?)
}

fn producer_with(addr: &str, codec: Codec) -> anyhow::Result<Producer> {
    Ok(Producer::new(
        &kafka(addr),
        Arc::new(codec),
        Duration::from_secs(30),
        Health::with_grace(Duration::from_secs(60)),
    )?)
}

fn request(n: usize) -> SyncRequest {
    SyncRequest {
        context: Context {
            organization_id: "o".into(),
            ehr_target_id: "t".into(),
            patient_id: "p".into(),
            patient_reference: "Patient/1".into(),
            provider: "withings".into(),
            link_id: format!("link-{n}"),
            provider_user_id: "1".into(),
            sync_request_id: format!("input-{n}"),
            trigger: "MANUAL".into(),
            received_at: 0,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        },
        categories: vec![],
        window_start: None,
        window_end: None,
        provider_event: None,
    }
}

/// Produces `count` inputs, keyed so they spread over the partitions.
async fn produce_inputs(p: &Producer, from: usize, count: usize) -> anyhow::Result<()> {
    for n in from..from + count {
        p.send_record(IN, &format!("key-{n}"), &request(n)).await?;
    }
    Ok(())
}

fn settings(group: &str) -> StageSettings {
    settings_giving_up_after(group, Duration::from_secs(300))
}

/// Settings whose undecodable records wait at most `registry_give_up` for the registry.
fn settings_giving_up_after(group: &str, registry_give_up: Duration) -> StageSettings {
    settings_with(group, registry_give_up, Duration::from_secs(45))
}

/// Settings with both bounds given.
fn settings_with(group: &str, registry_give_up: Duration, orphan_after: Duration) -> StageSettings {
    StageSettings {
        stage: "runtime-test",
        group_id: group.to_string(),
        input_topics: vec![IN],
        max_batch: 50,
        linger: Duration::from_millis(5),
        tick: None,
        registry_give_up,
        rejoin_after: Duration::from_secs(20),
        orphan_after,
        // tansu answers a fetch only at the end of the wait.
        fetch_wait: Duration::from_millis(50),
    }
}

/// Copies every input to `rt.out`, naming the input in `provider_event`; optionally slow,
/// failing transiently a number of times, and limiting commits.
#[derive(Clone, Default)]
struct Copier {
    delay: Duration,
    fail_first: Arc<Mutex<usize>>,
    /// The state this processor changes only in `apply`: batches applied.
    applied: usize,
    /// What each `process` call saw: (state, first input's sync_request_id).
    seen: Arc<Mutex<Vec<(usize, String)>>>,
    commit_limit: Option<i64>,
}

impl Processor for Copier {
    type In = SyncRequest;
    type Change = usize;

    async fn process(
        &mut self,
        batch: &[Input<SyncRequest>],
        out: &mut Emitter,
    ) -> Result<usize, StageError> {
        if let (Ok(mut seen), Some(first)) = (self.seen.lock(), batch.first()) {
            seen.push((self.applied, first.value.context.sync_request_id.clone()));
        }
        tokio::time::sleep(self.delay).await;
        let fail = match self.fail_first.lock() {
            Ok(mut left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        };
        if fail {
            return Err(StageError::transient("test", "asked to fail"));
        }
        for input in batch {
            let mut r = input.value.clone();
            r.provider_event = Some(input.value.context.sync_request_id.clone());
            out.follow(input);
            out.emit(OUT, &format!("{}", input.offset), &r).await?;
        }
        Ok(batch.len())
    }

    async fn apply(&mut self, _change: &usize) -> Result<(), StageError> {
        self.applied += 1;
        Ok(())
    }

    fn commit_point(&self, _t: &str, _p: i32, next: i64) -> (i64, Option<String>) {
        match self.commit_limit {
            Some(limit) => (next.min(limit), None),
            None => (next, None),
        }
    }
}

struct Member {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_member(addr: &str, group: &str, processor: Copier) -> anyhow::Result<Member> {
    start_member_with(addr, settings(group), Codec::embedded()?, processor)
}

/// Starts a member with these settings, decoding and encoding with `codec`.
fn start_member_with(
    addr: &str,
    s: StageSettings,
    codec: Codec,
    processor: Copier,
) -> anyhow::Result<Member> {
    let stop = CancellationToken::new();
    let p = producer_with(addr, codec)?;
    let (k, t) = (kafka(addr), stop.clone());
    let task = tokio::spawn(async move {
        run_stage(
            s,
            &k,
            p,
            processor,
            Health::with_grace(Duration::from_secs(60)),
            t,
        )
        .await
    });
    Ok(Member { stop, task })
}

/// The input ids copied to `rt.out` so far.
async fn copied(addr: &str) -> anyhow::Result<BTreeSet<String>> {
    copied_with(addr, &Codec::embedded()?).await
}

/// The input ids copied to `rt.out` so far, read with `codec`.
async fn copied_with(addr: &str, codec: &Codec) -> anyhow::Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    let addr = addr.to_string();
    let raw = tokio::task::spawn_blocking(move || read_all(&addr, OUT)).await??;
    for r in raw {
        let value: SyncRequest = codec.decode(&r.1).await?;
        if let Some(id) = value.provider_event {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// The dead letters so far, read with `codec`.
async fn dead_letters(addr: &str, codec: &Codec) -> anyhow::Result<Vec<DeadLetter>> {
    let addr = addr.to_string();
    let raw = tokio::task::spawn_blocking(move || read_all(&addr, topic::DEAD_LETTER)).await??;
    let mut dead = Vec::with_capacity(raw.len());
    for r in raw {
        dead.push(codec.decode(&r.1).await?);
    }
    Ok(dead)
}

async fn lag(addr: &str, group: &str) -> anyhow::Result<i64> {
    let (a, g) = (addr.to_string(), group.to_string());
    tokio::task::spawn_blocking(move || group_lag(&a, &g, IN)).await?
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `group` has committed everything on the input topic.
async fn drained(addr: &str, group: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_for("the group to commit everything", timeout, async || {
        Ok(lag(addr, group).await? == 0)
    })
    .await
}

fn expected(count: usize) -> BTreeSet<String> {
    (0..count).map(|n| format!("input-{n}")).collect()
}

/// A minimal Confluent-compatible schema registry, serving what `schema_registry_converter`
/// calls:
///
/// * `POST /subjects/{subject}/versions` with `{"schema": "...", "schemaType": "AVRO"}`
///   registers the schema under the subject and answers `{"id": N}`; a schema registered before,
///   under any subject, keeps its id.
/// * `GET /schemas/ids/{id}?deleted=true` answers `{"schema": "..."}`, or 404 with
///   `{"error_code": 40403, "message": "Schema not found"}` for an id it does not have.
///
/// It can answer 404 for a schema it has the first few times it is asked, as a registry
/// re-reading its schemas topic after a restart does, and counts the requests for each id.
#[derive(Clone, Default)]
struct Registry(Arc<Mutex<RegistryState>>);

#[derive(Default)]
struct RegistryState {
    /// The registered schemas: id `n` is `schemas[n - 1]`.
    schemas: Vec<Value>,
    /// The ids registered under each subject, oldest first.
    subjects: BTreeMap<String, Vec<u32>>,
    /// `GET /schemas/ids/{id}` requests per id.
    fetches: HashMap<u32, usize>,
    /// How many more times to answer 404 for an id it has.
    hidden: HashMap<u32, usize>,
}

const SR_JSON: &str = "application/vnd.schemaregistry.v1+json";

impl Registry {
    /// Serves on a free local port; returns the base URL.
    async fn start(&self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = Router::new()
            .route("/subjects/{subject}/versions", post(register))
            .route("/schemas/ids/{id}", get(schema_by_id))
            .fallback(async || sr_error(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found"))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(url)
    }

    fn state(&self) -> MutexGuard<'_, RegistryState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The id of the latest schema registered under `subject`.
    fn latest_id(&self, subject: &str) -> Option<u32> {
        self.state().subjects.get(subject)?.last().copied()
    }

    /// Answers 404 for `id` the next `times` times it is asked for.
    fn hide(&self, id: u32, times: usize) {
        self.state().hidden.insert(id, times);
    }

    /// How many times `id` was asked for.
    fn fetches(&self, id: u32) -> usize {
        self.state().fetches.get(&id).copied().unwrap_or(0)
    }
}

/// A response in the registry's content type.
fn sr_json(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, SR_JSON)], body.to_string()).into_response()
}

/// The registry's error body.
fn sr_error(status: StatusCode, error_code: u32, message: &str) -> Response {
    sr_json(
        status,
        json!({ "error_code": error_code, "message": message }),
    )
}

async fn register(
    State(registry): State<Registry>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return sr_error(StatusCode::BAD_REQUEST, 400, &e.to_string()),
    };
    // Confluent reads a missing `schemaType` as Avro.
    let is_avro = matches!(
        request.get("schemaType").and_then(Value::as_str),
        None | Some("AVRO")
    );
    // Avro schemas are JSON; two registrations of the same JSON are the same schema.
    let schema = request
        .get("schema")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str::<Value>(s).ok());
    let Some(schema) = schema.filter(|_| is_avro) else {
        return sr_error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema");
    };
    let mut state = registry.state();
    let id = match state.schemas.iter().position(|s| *s == schema) {
        Some(i) => i as u32 + 1,
        None => {
            state.schemas.push(schema);
            state.schemas.len() as u32
        }
    };
    let versions = state.subjects.entry(subject).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    sr_json(StatusCode::OK, json!({ "id": id }))
}

async fn schema_by_id(State(registry): State<Registry>, Path(id): Path<String>) -> Response {
    let not_found = || sr_error(StatusCode::NOT_FOUND, 40403, "Schema not found");
    let Ok(id) = id.parse::<u32>() else {
        return not_found();
    };
    let mut state = registry.state();
    *state.fetches.entry(id).or_default() += 1;
    if let Some(left) = state.hidden.get_mut(&id)
        && *left > 0
    {
        *left -= 1;
        return not_found();
    }
    match state.schemas.get((id as usize).wrapping_sub(1)) {
        // Confluent leaves `schemaType` out for Avro.
        Some(schema) => sr_json(StatusCode::OK, json!({ "schema": schema.to_string() })),
        None => not_found(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_members_joining_and_leaving_mid_stream_lose_nothing() -> anyhow::Result<()> {
    let b = broker("rebalance").await?;
    let group = "rt.rebalance";
    let p = producer(&b.addr)?;
    const TOTAL: usize = 6000;
    produce_inputs(&p, 0, 1000).await?;
    let slow = Copier {
        delay: Duration::from_millis(15),
        ..Copier::default()
    };
    let a = start_member(&b.addr, group, slow.clone())?;
    // Rebalances land while records stream in and every member is mid-batch.
    let feeder = {
        let p = p.clone();
        tokio::spawn(async move { produce_inputs(&p, 1000, TOTAL - 1000).await })
    };
    // Three rounds of two members joining, then leaving: one gracefully, one dropped
    // mid-batch without its graceful path.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m2 = start_member(&b.addr, group, slow.clone())?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m3 = start_member(&b.addr, group, slow.clone())?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        m2.stop.cancel();
        m2.task.await??;
        tokio::time::sleep(Duration::from_secs(2)).await;
        m3.task.abort();
        let _ = m3.task.await;
    }
    feeder.await??;
    drained(&b.addr, group, Duration::from_secs(120)).await?;
    let got = copied(&b.addr).await?;
    let want = expected(TOTAL);
    let missing: Vec<&String> = want.difference(&got).collect();
    a.stop.cancel();
    a.task.await??;
    assert!(
        missing.is_empty(),
        "{} inputs committed but never copied, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_shutdown_during_a_retry_commits_nothing_and_the_next_member_gets_everything()
-> anyhow::Result<()> {
    let b = broker("shutdown").await?;
    let group = "rt.shutdown";
    let p = producer(&b.addr)?;
    produce_inputs(&p, 0, 20).await?;
    let failing = Copier {
        fail_first: Arc::new(Mutex::new(usize::MAX)),
        ..Copier::default()
    };
    let seen = failing.seen.clone();
    let m = start_member(&b.addr, group, failing)?;
    wait_for("two failed attempts", Duration::from_secs(60), async || {
        Ok(seen.lock().map(|s| s.len()).unwrap_or(0) >= 2)
    })
    .await?;
    m.stop.cancel();
    m.task.await??;
    assert_eq!(lag(&b.addr, group).await?, 20, "nothing may be committed");
    assert!(copied(&b.addr).await?.is_empty());

    let m = start_member(&b.addr, group, Copier::default())?;
    drained(&b.addr, group, Duration::from_secs(60)).await?;
    m.stop.cancel();
    m.task.await??;
    assert_eq!(copied(&b.addr).await?, expected(20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_retried_batch_sees_the_state_of_its_first_attempt() -> anyhow::Result<()> {
    let b = broker("retry").await?;
    let group = "rt.retry";
    let p = producer(&b.addr)?;
    produce_inputs(&p, 0, 1).await?;
    let copier = Copier {
        fail_first: Arc::new(Mutex::new(2)),
        ..Copier::default()
    };
    let seen = copier.seen.clone();
    let m = start_member(&b.addr, group, copier)?;
    wait_for("the group to commit", Duration::from_secs(60), async || {
        Ok(lag(&b.addr, group).await? == 0)
    })
    .await?;
    produce_inputs(&p, 1, 1).await?;
    wait_for(
        "the group to commit again",
        Duration::from_secs(60),
        async || Ok(lag(&b.addr, group).await? == 0),
    )
    .await?;
    m.stop.cancel();
    m.task.await??;
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        seen,
        vec![
            (0, "input-0".to_string()),
            (0, "input-0".to_string()),
            (0, "input-0".to_string()),
            (1, "input-1".to_string()),
        ],
        "two failed attempts and the success see state 0; the next batch sees it applied once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_commits_never_pass_the_processors_commit_point() -> anyhow::Result<()> {
    let b = broker("commitpoint").await?;
    let group = "rt.commitpoint";
    let p = producer(&b.addr)?;
    // All on one key: one partition, offsets 0..10.
    for n in 0..10 {
        p.send_record(IN, "one-key", &request(n)).await?;
    }
    let m = start_member(
        &b.addr,
        group,
        Copier {
            commit_limit: Some(4),
            ..Copier::default()
        },
    )?;
    wait_for("all ten copied", Duration::from_secs(60), async || {
        Ok(copied(&b.addr).await?.len() == 10)
    })
    .await?;
    wait_for(
        "the commit at the commit point",
        Duration::from_secs(30),
        async || Ok(lag(&b.addr, group).await? == 6),
    )
    .await?;
    m.stop.cancel();
    m.task.await??;
    assert_eq!(
        lag(&b.addr, group).await?,
        6,
        "the final commit keeps the commit point too"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_outputs_carry_their_inputs_trace_with_a_span_of_their_own() -> anyhow::Result<()> {
    let b = broker("trace").await?;
    let group = "rt.trace";
    let p = producer(&b.addr)?;
    let parent = Trace::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .context("the W3C example")?;
    // input-0 traced, input-1 without any header
    for (n, headers) in [(0, vec![parent.header()]), (1, vec![])] {
        let payload = p.codec().encode(IN, &request(n)).await?;
        p.send_all(&[OutRecord {
            topic: IN.into(),
            partition: None,
            key: Some(format!("key-{n}").into_bytes()),
            payload,
            headers,
        }])
        .await?;
    }
    let m = start_member(&b.addr, group, Copier::default())?;
    drained(&b.addr, group, Duration::from_secs(60)).await?;
    m.stop.cancel();
    m.task.await??;
    let out = read_topic(&kafka(&b.addr), OUT, Duration::from_secs(30))?;
    ensure_eq(out.len(), 2, "outputs")?;
    let codec = Codec::embedded()?;
    for r in out {
        let value: SyncRequest = codec.decode(&r.payload).await?;
        let traces: Vec<_> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "traceparent")
            .collect();
        match value.provider_event.as_deref() {
            Some("input-0") => {
                ensure_eq(traces.len(), 1, "traceparent headers of input-0's output")?;
                let child = Trace::from_headers(&r.headers).context("a valid traceparent")?;
                ensure_eq(child.trace_id(), parent.trace_id(), "trace id")?;
                anyhow::ensure!(child != parent, "the output reuses its input's span");
            }
            Some("input-1") => {
                ensure_eq(traces.len(), 0, "traceparent headers of input-1's output")?
            }
            other => anyhow::bail!("unexpected output {other:?}"),
        }
    }
    Ok(())
}

fn ensure_eq<T: PartialEq + std::fmt::Debug>(got: T, want: T, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(got == want, "{what}: got {got:?}, want {want:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_undecodable_record_is_dead_lettered_and_the_rest_processed() -> anyhow::Result<()>
{
    let b = broker("decode").await?;
    let group = "rt.decode";
    let p = producer(&b.addr)?;
    produce_inputs(&p, 0, 3).await?;
    produce_raw(&b.addr, IN, "key-0", b"\x00\x00\x00\x00\x01not avro").await?;
    produce_inputs(&p, 3, 3).await?;
    let m = start_member(&b.addr, group, Copier::default())?;
    drained(&b.addr, group, Duration::from_secs(60)).await?;
    m.stop.cancel();
    m.task.await??;
    assert_eq!(copied(&b.addr).await?, expected(6));
    let dead = dead_letters(&b.addr, &Codec::embedded()?).await?;
    assert_eq!(dead.len(), 1, "exactly the garbage record is dead-lettered");
    let dl = &dead[0];
    assert_eq!(dl.topic, IN);
    assert_eq!(dl.error_kind, "decode");
    assert_eq!(
        dl.payload.as_deref(),
        Some(&b"\x00\x00\x00\x00\x01not avro"[..])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_registry_answering_404_for_a_moment_is_retried_with_its_cached_errors_cleared()
-> anyhow::Result<()> {
    let b = broker("registry-404").await?;
    let group = "rt.registry-404";
    let registry = Registry::default();
    let url = registry.start().await?;
    let p = producer_with(&b.addr, Codec::http(&url)?)?;
    produce_inputs(&p, 0, 1).await?;
    let id = registry
        .latest_id(&format!("{IN}-value"))
        .context("the producer registers the input's schema")?;
    // The client caches a 404 as final: only clearing it lets the fourth request through.
    registry.hide(id, 3);
    let m = start_member_with(
        &b.addr,
        settings(group),
        Codec::http(&url)?,
        Copier::default(),
    )?;
    wait_for("the group to commit", Duration::from_secs(60), async || {
        Ok(lag(&b.addr, group).await? == 0)
    })
    .await
    .with_context(|| {
        format!(
            "the registry was asked for schema {id} {} times",
            registry.fetches(id)
        )
    })?;
    let fetches = registry.fetches(id);
    m.stop.cancel();
    m.task.await??;
    assert!(
        fetches >= 4,
        "three answers 404, then the schema: asked {fetches} times"
    );
    let reader = Codec::http(&url)?;
    assert_eq!(copied_with(&b.addr, &reader).await?, expected(1));
    assert!(
        dead_letters(&b.addr, &reader).await?.is_empty(),
        "nothing is dead-lettered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_schema_id_the_registry_never_had_is_dead_lettered_after_the_bound()
-> anyhow::Result<()> {
    let b = broker("registry-unknown").await?;
    let group = "rt.registry-unknown";
    let registry = Registry::default();
    let url = registry.start().await?;
    let p = producer_with(&b.addr, Codec::http(&url)?)?;
    // Magic byte 0, schema id 99 (big-endian), a body.
    const UNKNOWN_ID: &[u8] = b"\x00\x00\x00\x00\x63never registered";
    produce_inputs(&p, 0, 3).await?;
    produce_raw(&b.addr, IN, "key-0", UNKNOWN_ID).await?;
    produce_inputs(&p, 3, 3).await?;
    let give_up = Duration::from_secs(3);
    let started = Instant::now();
    let m = start_member_with(
        &b.addr,
        settings_giving_up_after(group, give_up),
        Codec::http(&url)?,
        Copier::default(),
    )?;
    drained(&b.addr, group, Duration::from_secs(60)).await?;
    let elapsed = started.elapsed();
    m.stop.cancel();
    m.task.await??;
    assert!(
        elapsed >= give_up,
        "the record waits for the registry for the bound, committed after {elapsed:?}"
    );
    assert!(
        registry.fetches(99) >= 2,
        "the id is asked for again with the cached 404 cleared: asked {} times",
        registry.fetches(99)
    );
    let reader = Codec::http(&url)?;
    assert_eq!(copied_with(&b.addr, &reader).await?, expected(6));
    let dead = dead_letters(&b.addr, &reader).await?;
    assert_eq!(
        dead.len(),
        1,
        "exactly the record of id 99 is dead-lettered"
    );
    assert_eq!(dead[0].error_kind, "schema_registry");
    assert_eq!(dead[0].topic, IN);
    assert_eq!(dead[0].payload.as_deref(), Some(UNKNOWN_ID));
    Ok(())
}

/// A member that claims its partitions every second and takes over partitions unclaimed
/// for 6 s.
fn start_claiming_member(addr: &str, group: &str) -> anyhow::Result<Member> {
    start_member_with(
        addr,
        settings_with(group, Duration::from_secs(300), Duration::from_secs(6)),
        Codec::embedded()?,
        Copier::default(),
    )
}

/// The environment variables that turn [`dead_member`] into a group member.
const DEAD_MEMBER_ENV: [&str; 2] = ["OHX_RT_DEAD_MEMBER_ADDR", "OHX_RT_DEAD_MEMBER_GROUP"];

/// Not a test on its own: run by [`test_the_partitions_of_a_member_killed_without_leaving_are_taken_over`]
/// as a child process, it joins the group with a plain consumer, prints `assigned N` once it
/// owns partitions, and keeps polling until it is killed.
#[test]
#[ignore = "a child process of another test"]
fn dead_member() -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::io::Write as _;
    let (Ok(addr), Ok(group)) = (
        std::env::var(DEAD_MEMBER_ENV[0]),
        std::env::var(DEAD_MEMBER_ENV[1]),
    ) else {
        return Ok(());
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &addr)
        .set("broker.address.family", "v4")
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "10000")
        .create()?;
    consumer.subscribe(&[IN])?;
    let mut told = false;
    loop {
        let _ = consumer.poll(Duration::from_millis(100));
        let owned = consumer.assignment()?.count();
        if owned > 0 && !told {
            println!("assigned {owned}");
            std::io::stdout().flush()?;
            told = true;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_the_partitions_of_a_member_killed_without_leaving_are_taken_over()
-> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let b = broker("killed").await?;
    let group = "rt.killed";
    let p = producer(&b.addr)?;
    produce_inputs(&p, 0, 100).await?;
    let a = start_claiming_member(&b.addr, group)?;
    wait_for(
        "the first member to copy everything",
        Duration::from_secs(60),
        async || Ok(copied(&b.addr).await?.len() == 100),
    )
    .await?;
    // A second member joins, takes some partitions over, and is SIGKILLed: it never leaves.
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "dead_member", "--ignored", "--nocapture"])
        .env(DEAD_MEMBER_ENV[0], &b.addr)
        .env(DEAD_MEMBER_ENV[1], group)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let assigned = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("assigned ") {
                return Ok::<_, anyhow::Error>(line);
            }
        }
        anyhow::bail!("the second member exited before it was assigned anything")
    })
    .await
    .context("the second member got no partition within 60 s")??;
    child.kill().await?;
    // Records on every partition, the dead member's included.
    produce_inputs(&p, 100, 100).await?;
    let taken_over = wait_for(
        "the killed member's partitions to be taken over",
        Duration::from_secs(90),
        async || Ok(copied(&b.addr).await?.len() == 200),
    )
    .await;
    let got = copied(&b.addr).await?;
    a.stop.cancel();
    a.task.await??;
    taken_over.with_context(|| {
        format!(
            "after the second member ({assigned}) was killed, {} of 200 inputs were copied",
            got.len()
        )
    })?;
    assert_eq!(got, expected(200));
    Ok(())
}

/// Runs the `ohx` command against the broker at `addr`.
async fn ohx(addr: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(
        tokio::process::Command::new(ohx_tests::stack::bin_dir().join("ohx"))
            .env("OHX_KAFKA_BOOTSTRAP", addr)
            .args(args)
            .output()
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_replay_refuses_a_group_with_live_members_and_a_stopped_member_releases_its_claims()
-> anyhow::Result<()> {
    let b = broker("replay").await?;
    let group = "rt.replay";
    let p = producer(&b.addr)?;
    produce_inputs(&p, 0, 20).await?;
    let a = start_claiming_member(&b.addr, group)?;
    let claims = async || -> anyhow::Result<usize> {
        let addr = b.addr.clone();
        let found = tokio::task::spawn_blocking(move || {
            ohx_common::kafka::leases::read_claims(&kafka(&addr), group, IN)
        })
        .await??;
        Ok(
            ohx_common::kafka::leases::live(&found, chrono::Utc::now().timestamp_millis(), 45_000)
                .len(),
        )
    };
    wait_for(
        "every partition claimed",
        Duration::from_secs(60),
        async || Ok(claims().await? == PARTITIONS as usize),
    )
    .await?;
    let refused = ohx(&b.addr, &["replay", "--group", group, "--topic", IN]).await?;
    assert!(
        !refused.status.success(),
        "a replay under live members must be refused"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("live members"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    wait_for("everything copied", Duration::from_secs(60), async || {
        Ok(copied(&b.addr).await?.len() == 20)
    })
    .await?;
    a.stop.cancel();
    a.task.await??;
    assert_eq!(
        claims().await?,
        0,
        "a member that stopped released its claims"
    );
    let dry = ohx(
        &b.addr,
        &["replay", "--group", group, "--topic", IN, "--dry-run"],
    )
    .await?;
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&dry.stdout)?;
    let total_from: i64 = plan["would_rewind"]
        .as_array()
        .context("would_rewind")?
        .iter()
        .map(|p| p["from"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(
        total_from, 20,
        "the plan names the committed offsets it would leave"
    );
    assert_eq!(lag(&b.addr, group).await?, 0, "a dry run rewinds nothing");
    let done = ohx(&b.addr, &["replay", "--group", group, "--topic", IN]).await?;
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(lag(&b.addr, group).await?, 20, "rewound to the beginning");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_service_whose_port_is_taken_exits_with_the_reason() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let bin = ohx_tests::stack::bin_dir().join("deduplicator");
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&bin)
            .env("OHX_HTTP_ADDR", &addr)
            .env("OHX_KAFKA_BOOTSTRAP", "127.0.0.1:1")
            .env("OHX_STARTUP_TIMEOUT_MS", "20000")
            .output(),
    )
    .await??;
    assert!(!output.status.success(), "it must exit with an error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stderr.contains("cannot listen on") || stdout.contains("cannot listen on"),
        "the reason names the port: {stderr} {stdout}"
    );
    drop(taken);
    Ok(())
}
