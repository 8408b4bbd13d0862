//! webhook-gateway throughput and latency on the local stack: tansu, PostgreSQL and the gateway
//! alone (no fetcher or other stage runs, so nothing but the gateway works on the sync
//! requests), with one organization, one Withings application and `OHX_BENCH_LINKS` links of
//! distinct users, so each webhook's lookups are realistic.
//!
//! 1. Steady load: `OHX_BENCH_RATE` Withings webhooks/s for `OHX_BENCH_SECONDS`, open loop
//!    (each request sent at its scheduled time in a task of its own); latency is measured from
//!    the scheduled time, so a gateway falling behind is not hidden (no coordinated omission).
//! 2. Maximum: `OHX_BENCH_CONCURRENCY` clients in a closed loop for 10 s.
//! 3. The broker's ceiling for the same work: an rdkafka producer with the gateway's producer
//!    settings sends the gateway's own sync-request records (read back from the topic: same
//!    key, payload and headers) to the same topic, with the same concurrency, for 10 s, each
//!    send awaited for its acknowledgement.
//!
//! Every webhook must be answered 2xx (the gateway answers only once the broker acknowledged).
//!
//! Run from the workspace root:
//! `cargo build --release --workspace --bins && cargo bench -p ohx-tests --bench gateway`
//! The binaries are taken from `OHX_BIN_DIR` if set (a relative one from the workspace root),
//! else from the release build (`target/release`, or `$CARGO_TARGET_DIR/release`).
//! Settings: `OHX_BENCH_RATE` webhooks/s (default 1000), `OHX_BENCH_SECONDS` (default 20),
//! `OHX_BENCH_CONCURRENCY` (default 64), `OHX_BENCH_LINKS` (default 1000).

use anyhow::{Context as _, bail, ensure};
use ohx_common::kafka::{KafkaSettings, inspect};
use ohx_common::records::topic;
use ohx_tests::stack::{Stack, minimal_stack, setting};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The Withings application's webhook token.
const TOKEN: &str = "bench-gateway-token";
/// Length of the closed-loop measurements.
const CLOSED_LOOP: Duration = Duration::from_secs(10);
/// `ohx` commands run at once while the links are created.
const SETUP_PARALLELISM: usize = 8;

/// Runs `ohx` (owned arguments, so that several run at once) and returns the `id` it printed.
async fn ohx_id(
    bin: PathBuf,
    env: Arc<Vec<(String, String)>>,
    args: Vec<String>,
) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin)
        .envs(env.iter().cloned())
        .args(&args)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "ohx {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .with_context(|| format!("ohx {args:?} printed nothing"))?;
    let v: serde_json::Value = serde_json::from_str(last)?;
    v.get("id")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("ohx {args:?} printed no id"))
}

/// Creates a patient and a Withings link (user `userid`) for each of `links` users.
async fn create_links(
    stack: &Stack,
    org: &str,
    target: &str,
    app: &str,
    links: usize,
) -> anyhow::Result<()> {
    let bin = stack.bin_dir.join("ohx");
    let env = Arc::new(stack.ohx_env());
    let mut set = tokio::task::JoinSet::new();
    for i in 0..links {
        if set.len() >= SETUP_PARALLELISM
            && let Some(done) = set.join_next().await
        {
            done??;
        }
        let (bin, env) = (bin.clone(), env.clone());
        let (org, target, app) = (org.to_owned(), target.to_owned(), app.to_owned());
        set.spawn(async move {
            let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
            let reference = format!("Patient/bench-{i}");
            let patient = ohx_id(
                bin.clone(),
                env.clone(),
                args(&[
                    "create-patient",
                    "--org",
                    &org,
                    "--target",
                    &target,
                    "--reference",
                    &reference,
                ]),
            )
            .await?;
            let user = userid(i).to_string();
            ohx_id(
                bin,
                env,
                args(&[
                    "create-link",
                    "--app",
                    &app,
                    "--patient",
                    &patient,
                    "--provider-user-id",
                    &user,
                    "--access-token",
                    "a",
                    "--refresh-token",
                    "r",
                ]),
            )
            .await?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok(())
}

/// The Withings user id of link `i`.
fn userid(i: usize) -> u64 {
    20_000_000 + i as u64
}

/// What one webhook got.
enum Answer {
    Ok,
    Status(u16),
    Failed,
}

/// Sends one Withings blood-pressure notification (a one-second window a day ago).
async fn notify(http: &reqwest::Client, url: &str, user: u64, t: i64) -> Answer {
    let form = [
        ("userid", user.to_string()),
        ("appli", "4".to_owned()),
        ("startdate", t.to_string()),
        ("enddate", t.to_string()),
    ];
    match http.post(url).form(&form).send().await {
        Ok(r) if r.status().is_success() => Answer::Ok,
        Ok(r) => Answer::Status(r.status().as_u16()),
        Err(_) => Answer::Failed,
    }
}

/// Notification time of request `i`: a day ago, spread over an hour.
fn notice_time(base: i64, i: usize) -> i64 {
    base - 86_400 + (i % 3_600) as i64
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn latency_line(sorted: &[Duration]) -> String {
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        millis(percentile(sorted, 0.5)),
        millis(percentile(sorted, 0.9)),
        millis(percentile(sorted, 0.99)),
        millis(sorted.last().copied().unwrap_or_default())
    )
}

/// Result of the open-loop run.
struct Steady {
    sent: usize,
    sent_in: Duration,
    latencies: Vec<Duration>,
    non_2xx: usize,
    failed: usize,
    statuses: HashMap<u16, usize>,
}

async fn steady(
    http: &reqwest::Client,
    url: &str,
    rate: f64,
    seconds: f64,
    links: usize,
) -> anyhow::Result<Steady> {
    let n = (rate * seconds).round() as usize;
    let url = Arc::new(url.to_owned());
    let base = chrono::Utc::now().timestamp();
    let mut tasks = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let answer = notify(&http, &url, userid(i % links), notice_time(base, i)).await;
            (due.elapsed(), answer)
        }));
    }
    let sent_in = started.elapsed();
    let mut out = Steady {
        sent: n,
        sent_in,
        latencies: Vec::with_capacity(n),
        non_2xx: 0,
        failed: 0,
        statuses: HashMap::new(),
    };
    for t in tasks {
        let (latency, answer) = t.await?;
        out.latencies.push(latency);
        match answer {
            Answer::Ok => {}
            Answer::Status(s) => {
                out.non_2xx += 1;
                *out.statuses.entry(s).or_default() += 1;
            }
            Answer::Failed => {
                out.non_2xx += 1;
                out.failed += 1;
            }
        }
    }
    out.latencies.sort_unstable();
    Ok(out)
}

/// Result of a closed-loop run.
struct Closed {
    ok: u64,
    bad: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Closed {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

async fn closed_loop(
    http: &reqwest::Client,
    url: &str,
    concurrency: usize,
    links: usize,
    length: Duration,
) -> anyhow::Result<Closed> {
    let url = Arc::new(url.to_owned());
    let base = chrono::Utc::now().timestamp();
    let started = Instant::now();
    let deadline = started + length;
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let (http, url, ok, bad) = (http.clone(), url.clone(), ok.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut k = 0usize;
            while Instant::now() < deadline {
                let i = w + k * concurrency;
                k += 1;
                let t0 = Instant::now();
                match notify(&http, &url, userid(i % links), notice_time(base, i)).await {
                    Answer::Ok => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
                latencies.push(t0.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await?);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Closed {
        ok: ok.load(Ordering::Relaxed),
        bad: bad.load(Ordering::Relaxed),
        elapsed,
        latencies,
    })
}

/// A record as the gateway wrote it.
struct Template {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

/// Reads up to `max` records of a topic from its start.
fn first_records(bootstrap: &str, topic: &str, max: usize) -> anyhow::Result<Vec<Template>> {
    let settings = KafkaSettings {
        bootstrap: bootstrap.to_owned(),
        extra: vec![],
    };
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", "ohx.bench.templates")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut available = 0;
    let mut marks = Vec::new();
    for p in inspect::partitions(&consumer, topic)? {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        marks.push((p, low, high));
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            available += high - low;
        }
    }
    let want = max.min(usize::try_from(available).unwrap_or(0));
    ensure!(want > 0, "{topic} is empty");
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        ensure!(
            Instant::now() < deadline,
            "read only {} records of {topic} (partition, low, high: {marks:?})",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            out.push(Template {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers: inspect::owned_headers(&m),
            });
        }
    }
    Ok(out)
}

/// A producer like the gateway's (services/common/src/kafka/producer.rs: idempotent, acks=all)
/// with a shorter linger (2 ms against the gateway's 5): the broker's ceiling is measured with
/// senders that each wait for one acknowledgement at a time, so a longer linger would lower it.
fn gateway_like_producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "0")
        .create()?)
}

/// `concurrency` senders, each producing one record and awaiting its acknowledgement at a time.
async fn broker_ceiling(
    bootstrap: &str,
    templates: Arc<Vec<Template>>,
    concurrency: usize,
    length: Duration,
) -> anyhow::Result<Closed> {
    let producer = gateway_like_producer(bootstrap)?;
    let started = Instant::now();
    let deadline = started + length;
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let (producer, templates, ok) = (producer.clone(), templates.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut k = 0usize;
            while Instant::now() < deadline {
                let t = &templates[(w + k * concurrency) % templates.len()];
                k += 1;
                let t0 = Instant::now();
                let mut headers = OwnedHeaders::new();
                for (key, value) in &t.headers {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
                let mut record = FutureRecord::to(topic::SYNC_REQUESTS)
                    .payload(&t.payload)
                    .headers(headers);
                if let Some(key) = &t.key {
                    record = record.key(key);
                }
                let delivery = loop {
                    match producer.send_result(record) {
                        Ok(d) => break d,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err((e, _)) => return Err(anyhow::Error::from(e)),
                    }
                };
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(e.into()),
                    Err(_) => bail!("delivery canceled"),
                }
                ok.fetch_add(1, Ordering::Relaxed);
                latencies.push(t0.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Closed {
        ok: ok.load(Ordering::Relaxed),
        bad: 0,
        elapsed,
        latencies,
    })
}

fn main() -> anyhow::Result<()> {
    let rate: f64 = setting("OHX_BENCH_RATE", 1000.0);
    let seconds: f64 = setting("OHX_BENCH_SECONDS", 20.0);
    let concurrency: usize = setting("OHX_BENCH_CONCURRENCY", 64usize).max(1);
    let links: usize = setting("OHX_BENCH_LINKS", 1000usize).max(1);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut stack =
            minimal_stack("gateway", &["webhook-gateway"], Duration::from_secs(30)).await?;
        let result = run(&mut stack, rate, seconds, concurrency, links).await;
        let stopped = stack.stop("webhook-gateway").await;
        stack.kill("tansu").await?;
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
    rate: f64,
    seconds: f64,
    concurrency: usize,
    links: usize,
) -> anyhow::Result<()> {
    let setup = Instant::now();
    let org = stack.ohx_id(&["create-org", "--name", "Bench"]).await?;
    // The gateway never calls the EHR: the target's address is not used.
    let target = stack
        .ohx_id(&[
            "create-target",
            "--org",
            &org,
            "--name",
            "ehr",
            "--base-url",
            "http://127.0.0.1:9/fhir",
        ])
        .await?;
    let app = stack
        .ohx_id(&[
            "create-app",
            "--org",
            &org,
            "--client-id",
            "bench",
            "--client-secret",
            "bench",
            "--webhook-token",
            TOKEN,
        ])
        .await?;
    create_links(stack, &org, &target, &app, links).await?;
    stack.start_stage("webhook-gateway").await?;
    println!(
        "setup: {links} links created and the gateway started in {:.1} s (binaries: {})",
        setup.elapsed().as_secs_f64(),
        stack.bin_dir.display()
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!(
        "{}/webhooks/withings?token={TOKEN}",
        stack.http_of("webhook-gateway")?
    );

    // Warm-up (connections, the gateway's database pool), not measured.
    let warm = closed_loop(&http, &url, 8, links, Duration::from_secs(2)).await?;
    ensure!(
        warm.bad == 0,
        "{} warm-up webhooks were not answered 2xx",
        warm.bad
    );
    // The gateway's records for the broker's ceiling, read while the topic is short: after the
    // runs below (~48,000 records) tansu 0.6 answered no read from the start within a minute.
    let templates = Arc::new(first_records(&stack.kafka, topic::SYNC_REQUESTS, links)?);

    // a. Steady load, open loop.
    let s = steady(&http, &url, rate, seconds, links).await?;
    println!(
        "a. steady {rate}/s for {seconds} s: {} webhooks (sent in {:.1} s); latency from the scheduled time: {}; non-2xx: {}",
        s.sent,
        s.sent_in.as_secs_f64(),
        latency_line(&s.latencies),
        s.non_2xx
    );

    // b. Maximum, closed loop.
    let max = closed_loop(&http, &url, concurrency, links, CLOSED_LOOP).await?;
    println!(
        "b. closed loop, {concurrency} clients, {:.1} s: {} webhooks 2xx, {} not; {:.0} webhooks/s; latency {}",
        max.elapsed.as_secs_f64(),
        max.ok,
        max.bad,
        max.rate(),
        latency_line(&max.latencies)
    );

    // c. The broker's ceiling for the gateway's records (taken above).
    let avg_key = templates
        .iter()
        .map(|t| t.key.as_ref().map_or(0, Vec::len))
        .sum::<usize>()
        / templates.len();
    let avg_payload = templates.iter().map(|t| t.payload.len()).sum::<usize>() / templates.len();
    let avg_headers = templates
        .iter()
        .map(|t| {
            t.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
        })
        .sum::<usize>()
        / templates.len();
    let broker = broker_ceiling(&stack.kafka, templates.clone(), concurrency, CLOSED_LOOP).await?;
    println!(
        "c. broker, {concurrency} sends in flight, {:.1} s: {} records acknowledged; {:.0} records/s; ack latency {}",
        broker.elapsed.as_secs_f64(),
        broker.ok,
        broker.rate(),
        latency_line(&broker.latencies)
    );

    let mut statuses: Vec<_> = s.statuses.iter().collect();
    statuses.sort();
    println!();
    println!("== webhook-gateway summary ==");
    println!(
        "links: {links}; record: key {avg_key} B, payload {avg_payload} B, headers {avg_headers} B (the gateway's own sync requests)"
    );
    println!(
        "steady {rate}/s x {seconds} s (open loop): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; non-2xx {} of {} (transport errors {}, statuses {statuses:?})",
        millis(percentile(&s.latencies, 0.5)),
        millis(percentile(&s.latencies, 0.9)),
        millis(percentile(&s.latencies, 0.99)),
        millis(s.latencies.last().copied().unwrap_or_default()),
        s.non_2xx,
        s.sent,
        s.failed
    );
    println!(
        "maximum ({concurrency} clients, closed loop): {:.0} webhooks/s (non-2xx {})",
        max.rate(),
        max.bad
    );
    println!(
        "broker ceiling ({concurrency} sends in flight, acks=all, idempotent): {:.0} records/s",
        broker.rate()
    );
    println!("gateway / broker: {:.2}", max.rate() / broker.rate());
    ensure!(
        s.non_2xx == 0 && max.bad == 0,
        "webhooks not answered 2xx: steady {}, closed loop {}",
        s.non_2xx,
        max.bad
    );
    Ok(())
}
