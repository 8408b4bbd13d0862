//! Webhook-to-FHIR-confirmed latency on the local stack (tansu, PostgreSQL, hfs, the Withings
//! simulator, the six stages as processes): Withings notifications for individual blood
//! pressure measurements at a steady rate; latency per Observation = publisher confirmation
//! time − gateway receive time, read from `ohx.publish-results.v1`.
//!
//! Run: `cargo build --release --workspace --bins && OHX_BIN_DIR=target/release cargo bench -p ohx-tests --bench latency`
//! Then, with every stage idle, the CPU the broker and each stage burn over
//! `OHX_BENCH_IDLE_SECONDS` (default 30).
//! Settings: `OHX_BENCH_RATE` webhooks/s (default 5), `OHX_BENCH_SECONDS` (default 60), and
//! `OHX_FETCH_WAIT_MS` passed to every stage when set (the local stack's default is 50 ms).

use anyhow::ensure;
use ohx_common::codec::Codec;
use ohx_common::records::{PublishResult, topic};
use ohx_tests::kafka_util::{read_all, wait_settled};
use ohx_tests::stack::{Stack, StackOptions};
use serde_json::json;
use std::time::{Duration, Instant};

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let rate: f64 = std::env::var("OHX_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let seconds: f64 = std::env::var("OHX_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60.0);
    // The simulated application gets enough budget for the rate (Withings' default is 120/min).
    let per_minute = ((rate * 60.0 * 2.0).ceil() as u64).max(120);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let options = StackOptions {
            sim_rate_limit_per_minute: Some(per_minute as u32),
            stage_env: [("OHX_WITHINGS_RATE_PER_MINUTE".to_owned(), per_minute.to_string())]
                .into_iter()
                .chain(std::env::var("OHX_FETCH_WAIT_MS").ok().map(|v| ("OHX_FETCH_WAIT_MS".to_owned(), v)))
                .collect(),
        };
        let stack = Stack::start_with(options).await?;
        let names = ["tansu", "hfs", "withings-sim", "webhook-gateway", "fetcher", "hourly-aggregator", "fhir-mapper", "deduplicator", "publisher"];
        let cpu = |stack: &Stack| -> Vec<f64> { names.iter().map(|name| stack.cpu_seconds(name)).collect() };
        let used = |before: &[f64], after: &[f64], over: Duration| -> String {
            names.iter().zip(before.iter().zip(after))
                .map(|(name, (b, a))| format!("{name} {:.1} %", 100.0 * (a - b) / over.as_secs_f64()))
                .collect::<Vec<_>>().join(", ")
        };
        let org = stack.ohx_id(&["create-org", "--name", "Bench"]).await?;
        let target = stack.ohx_id(&["create-target", "--org", &org, "--name", "hfs", "--base-url", &stack.fhir_base]).await?;
        let app = stack
            .ohx_id(&["create-app", "--org", &org, "--client-id", "bench", "--client-secret", "bench", "--webhook-token", "bench-token", "--api-base-url", &stack.sim_url])
            .await?;
        let userid = 7001;
        let r = stack.http.post(format!("{}/_sim/users", stack.sim_url))
            .json(&json!({"userid": userid, "client_id": "bench", "client_secret": "bench", "access_token": "a", "refresh_token": "r", "expires_in": 10800}))
            .send().await?;
        ensure!(r.status().is_success());
        stack.http.put(format!("{}/Patient/bench", stack.fhir_base)).header("Content-Type", "application/fhir+json")
            .json(&json!({"resourceType": "Patient", "id": "bench"})).send().await?;
        let patient = stack.ohx_id(&["create-patient", "--org", &org, "--target", &target, "--reference", "Patient/bench"]).await?;
        stack.ohx_id(&["create-link", "--app", &app, "--patient", &patient, "--provider-user-id", &userid.to_string(), "--access-token", "a", "--refresh-token", "r"]).await?;

        let n = (rate * seconds) as i64;
        // One reading a minute, or closer at high rates: every reading stays in the past two
        // days (a webhook window in the future is refused).
        let base = chrono::Utc::now().timestamp() - 2 * 86_400;
        let step = (2 * 86_400 / n.max(1)).clamp(1, 60);
        let groups: Vec<_> = (0..n).map(|i| json!({
            "grpid": 8_000_000 + i, "attrib": 0, "date": base + i * step, "created": base + i * step + 5, "modified": base + i * step + 5,
            "category": 1, "deviceid": "bench-bpm", "hash_deviceid": "bench-bpm", "modelid": 45, "model": "BPM Connect", "comment": null,
            "measures": [{"value": 12000 + i % 300, "type": 10, "unit": -2}, {"value": 80, "type": 9, "unit": 0}, {"value": 70, "type": 11, "unit": 0}]})).collect();
        stack.http.post(format!("{}/_sim/users/{userid}/measuregrps", stack.sim_url)).json(&json!({"measuregrps": groups})).send().await?;

        let gateway = stack.http_of("webhook-gateway")?;
        let cpu_before = cpu(&stack);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let http = stack.http.clone();
            let url = format!("{gateway}/webhooks/withings?token=bench-token");
            let t = base + i * step;
            tasks.push(tokio::spawn(async move {
                let r = http.post(url).form(&[("userid", userid.to_string()), ("appli", "4".into()), ("startdate", t.to_string()), ("enddate", t.to_string())]).send().await?;
                anyhow::ensure!(r.status().is_success(), "webhook {}", r.status());
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let sent_in = started.elapsed();
        wait_settled(&stack.kafka, Duration::from_secs(600)).await?;
        let busy = started.elapsed();
        let cpu_busy = used(&cpu_before, &cpu(&stack), busy);
        let codec = Codec::embedded()?;
        let mut latencies = Vec::new();
        for (_, payload) in read_all(&stack.kafka, topic::PUBLISH_RESULTS)? {
            let r: PublishResult = codec.decode(&payload).await?;
            if r.resource_type == "Observation" && (r.outcome == "created" || r.outcome == "updated") {
                latencies.push(r.confirmed_at - r.received_at);
            }
        }
        latencies.sort_unstable();
        println!("webhooks: {n} at {rate}/s (sent in {:.1} s); observations confirmed: {}", sent_in.as_secs_f64(), latencies.len());
        println!(
            "webhook -> FHIR confirmed latency: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            percentile(&latencies, 0.5), percentile(&latencies, 0.9), percentile(&latencies, 0.99), latencies.last().copied().unwrap_or(0)
        );
        println!("from the first webhook until every stage was idle ({:.1} s), CPU as % of one core: {cpu_busy}", busy.as_secs_f64());
        ensure!(latencies.len() as i64 >= 2 * n, "expected {} observations, saw {}", 2 * n, latencies.len());

        // Idle cost: with nothing to do, how much CPU the broker and each stage burn.
        let idle = Duration::from_secs_f64(
            std::env::var("OHX_BENCH_IDLE_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30.0),
        );
        let before = cpu(&stack);
        tokio::time::sleep(idle).await;
        println!("idle for {} s, CPU as % of one core: {}", idle.as_secs(), used(&before, &cpu(&stack), idle));
        stack.drop_database().await?;
        anyhow::Ok(())
    })
}
