//! Each stage's own processing in records per second, without a broker: Avro decode of the
//! input, the stage's pure core, Avro encode of the outputs. Also the aggregator's memory per
//! open series-hour. Run: `cargo bench -p ohx-tests --bench stages`.

use fhir_mapper::map::{MapperSettings, canonical_json, map_aggregate, map_measurement};
use fhir_mapper::mapping::Mapping;
use fhir_mapper::r4::R4Rules;
use fhir_mapper::stage::{MapperCore, MeasurementMapper};
use hourly_aggregator::window::{PartitionWindows, WindowConfig};
use ohx_common::codec::Codec;
use ohx_common::kafka::{Emitter, Input, Processor};
use ohx_common::records::{
    Component, Context, Device, FhirResource, HourlyAggregate, Measurement, SyncRequest,
    content_hash, series_key, topic,
};
use ohx_common::trace::Trace;
use ohx_providers::Provider;
use ohx_tests::fixtures::heart_rate_sample;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::time::Instant;

const HOUR: i64 = 3_600_000;

fn ctx() -> Context {
    Context {
        organization_id: "3f1d3b5e-0000-4000-8000-000000000001".into(),
        ehr_target_id: "3f1d3b5e-0000-4000-8000-000000000002".into(),
        patient_id: "3f1d3b5e-0000-4000-8000-000000000003".into(),
        patient_reference: "Patient/p1".into(),
        provider: "withings".into(),
        link_id: "3f1d3b5e-0000-4000-8000-000000000004".into(),
        provider_user_id: "4242".into(),
        sync_request_id: "3f1d3b5e-0000-4000-8000-000000000005".into(),
        trigger: "WEBHOOK".into(),
        received_at: 1_790_000_000_000,
        fhir_version: ohx_common::records::FHIR_R5.into(),
        deliveries: Vec::new(),
    }
}

fn hr(i: i64, series: &str) -> Measurement {
    let t = 1_790_000_000_000 - 1_790_000_000_000 % HOUR + i * 60_000;
    // Each hour's last sample ends a fetch through the end of that hour.
    let fetched_through = (i.rem_euclid(60) == 59).then_some(t + 60_000);
    let mut m = heart_rate_sample(ctx(), 4242, "p", t, 60.0 + (i % 40) as f64, fetched_through);
    m.series_key = series.to_string();
    m
}

/// 30 s of a single-lead ECG at 300 Hz (9000 µV samples), as `v2/heart get` answers it.
fn ecg_signal(i: i64) -> Vec<i64> {
    (0..9000).map(|s| ((s * 37 + i) % 1201) - 600).collect()
}

/// A Withings ECG recording as the fetcher emits it.
fn ecg(i: i64) -> Measurement {
    let start = 1_790_000_000_000 + i * 60_000;
    Measurement {
        context: ctx(),
        measurement_id: format!("withings:4242:ecg:{}", 557_000_000 + i),
        series_key: series_key("p", "withings", "ecg"),
        data_type: "ecg".into(),
        aggregation: "INDIVIDUAL".into(),
        effective_start: start,
        effective_end: Some(start + 30_000),
        utc_offset_seconds: Some(3600),
        components: vec![
            Component {
                code: "rhythm".into(),
                value: 1.0 + (i % 3) as f64,
                unit: "1".into(),
                decimals: None,
            },
            Component {
                code: "heart_rate".into(),
                value: 60.0 + (i % 40) as f64,
                unit: "/min".into(),
                decimals: None,
            },
        ],
        device: Some(Device {
            device_id: "sw-1".into(),
            model: Some("ScanWatch".into()),
            model_id: Some("94".into()),
            manufacturer: Some("Withings".into()),
        }),
        entry_method: Some("device".into()),
        provider_group_id: Some(format!("{}", 557_000_000 + i)),
        provider_modified_at: Some(start + 40_000),
        fetched_through: None,
        status: None,
        waveform: Some(ohx_common::records::Waveform {
            unit: "uV".into(),
            origin: 0.0,
            factor: None,
            interval: 1000.0 / 300.0,
            interval_unit: "ms".into(),
            samples: ecg_signal(i).into_iter().map(|s| s as i32).collect(),
            code_map: None,
        }),
    }
}

fn bp(i: i64) -> Measurement {
    Measurement {
        context: ctx(),
        measurement_id: format!("withings:4242:{}:bp", 1_000_000 + i),
        series_key: series_key("p", "withings", "blood_pressure"),
        data_type: "blood_pressure".into(),
        aggregation: "INDIVIDUAL".into(),
        effective_start: 1_790_000_000_000 + i * 1000,
        effective_end: None,
        utc_offset_seconds: Some(3600),
        components: vec![
            Component {
                code: "systolic".into(),
                value: 120.0 + (i % 20) as f64,
                unit: "mm[Hg]".into(),
                decimals: None,
            },
            Component {
                code: "diastolic".into(),
                value: 80.0 + (i % 10) as f64,
                unit: "mm[Hg]".into(),
                decimals: None,
            },
        ],
        device: Some(Device {
            device_id: "bpm".into(),
            model: Some("BPM Connect".into()),
            model_id: Some("45".into()),
            manufacturer: Some("Withings".into()),
        }),
        entry_method: Some("device".into()),
        provider_group_id: Some((1_000_000 + i).to_string()),
        provider_modified_at: None,
        fetched_through: None,
        status: None,
        waveform: None,
    }
}

/// When a measurement started: wall time and the process's CPU time, so a figure stays
/// meaningful on a machine busy with other work (records per CPU-second = one core's rate).
struct Clock {
    wall: Instant,
    cpu: f64,
}

impl Clock {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: ohx_tests::stack::cpu_seconds_of("self"),
        }
    }
}

fn report(stage: &str, what: &str, n: usize, started: Clock) {
    let secs = started.wall.elapsed().as_secs_f64();
    let cpu = ohx_tests::stack::cpu_seconds_of("self") - started.cpu;
    println!(
        "{stage:<18} {what:<58} {:>9.0} records/CPU-s {:>9.0} records/s  ({n} in {secs:.2} s, {cpu:.2} CPU-s)",
        n as f64 / cpu.max(1e-9),
        n as f64 / secs
    );
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Measurements as the fhir-mapper reads them: a batch of 500 decoded, each with the
/// traceparent its producer attached (`headers`, one per record of the chunk, made before the
/// clock starts: the broker hands them over, the stage does not make them).
async fn traced_batch(
    codec: &Codec,
    batch_index: usize,
    chunk: &[Vec<u8>],
    headers: &[(String, Vec<u8>)],
) -> anyhow::Result<Vec<Input<Measurement>>> {
    let mut batch = Vec::with_capacity(chunk.len());
    for (i, (bytes, header)) in chunk.iter().zip(headers).enumerate() {
        batch.push(Input {
            topic: topic::MEASUREMENTS.to_string(),
            partition: 0,
            offset: (batch_index * 500 + i) as i64,
            key: None,
            value: codec.decode::<Measurement>(bytes).await?,
            payload: Vec::new(),
            headers: vec![header.clone()],
        });
    }
    Ok(batch)
}

/// Where a BP measurement's time goes in the fhir-mapper, part by part, in µs per measurement
/// (the same inputs as the stage step, in batches of 500 like the stage, each part timed in
/// its own loop over the batch).
fn mapper_breakdown(
    rt: &tokio::runtime::Runtime,
    codec: &Codec,
    core: &MapperCore,
    inputs: &[Vec<u8>],
) -> anyhow::Result<()> {
    let mut parts = [0f64; 5];
    for chunk in inputs.chunks(500) {
        let t = Instant::now();
        let mut measurements = Vec::with_capacity(chunk.len());
        rt.block_on(async {
            for bytes in chunk {
                measurements.push(codec.decode::<Measurement>(bytes).await?);
            }
            anyhow::Ok(())
        })?;
        parts[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut mapped = Vec::with_capacity(chunk.len());
        for m in &measurements {
            mapped.push(map_measurement(m, &core.table, &core.settings)?);
        }
        parts[1] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for r in mapped.iter().flatten() {
            core.validator
                .validate_all(&r.json)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        parts[2] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let texts: Vec<Vec<String>> = mapped
            .iter()
            .map(|rs| rs.iter().map(|r| canonical_json(&r.json)).collect())
            .collect();
        parts[3] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        rt.block_on(async {
            for ((m, resources), texts) in measurements.iter().zip(&mapped).zip(texts) {
                for (r, text) in resources.iter().zip(texts) {
                    let record = FhirResource {
                        context: m.context.clone(),
                        identity: r.id.clone(),
                        resource_type: r.resource_type.clone(),
                        resource_id: r.id.clone(),
                        resource: text,
                        source_ids: vec![m.measurement_id.clone()],
                        source_revision: 0,
                    };
                    black_box(codec.encode(topic::FHIR_RESOURCES, &record).await?);
                }
            }
            anyhow::Ok(())
        })?;
        parts[4] += t.elapsed().as_secs_f64();
    }
    let [decode, map, validate, canonical, encode] = parts.map(|p| p * 1e6 / inputs.len() as f64);
    println!(
        "{:<18} {:<58} decode {decode:.2}, map {map:.2}, validate {validate:.2}, canonical JSON {canonical:.2}, encode {encode:.2}",
        "fhir-mapper", "BP Measurement: µs per part, all 3 resources of each"
    );
    Ok(())
}

/// The fhir-mapper as the stage runs it (decode a batch of 500, process it, apply the change),
/// timed with a fresh mapper once a first run let the validator learn the resources' shapes;
/// returns the outputs (of the first run). `what` names the input and `version` the FHIR version in the report
/// (empty: R5).
fn mapper_step(
    rt: &tokio::runtime::Runtime,
    codec: &Codec,
    core: &std::sync::Arc<MapperCore>,
    inputs: &[Vec<u8>],
    (what, version): (&str, &str),
) -> anyhow::Result<Vec<Vec<u8>>> {
    let shared_codec = std::sync::Arc::new(Codec::embedded()?);
    let headers: Vec<_> = inputs.iter().map(|_| Trace::root().header()).collect();
    // The stage's loop over every batch; `keep` gets each batch's outputs.
    let run = |mut keep: Box<dyn FnMut(&Emitter) + '_>| {
        let mut mapper = MeasurementMapper::new(core.clone());
        rt.block_on(async {
            for (batch_index, chunk) in inputs.chunks(500).enumerate() {
                let headers = &headers[batch_index * 500..];
                let batch = traced_batch(codec, batch_index, chunk, headers).await?;
                let mut out = Emitter::new("fhir-mapper", shared_codec.clone());
                let change = mapper.process(&batch, &mut out).await?;
                mapper.apply(&change).await?;
                keep(&out);
            }
            anyhow::Ok(())
        })
    };
    // Once so the validator learns the resources' shapes, keeping the outputs (copying them
    // costs time the stage does not spend: it hands them to the producer).
    let mut outputs = Vec::new();
    run(Box::new(|out| {
        outputs.extend(out.records().map(|r| r.payload.clone()))
    }))?;
    let started = Clock::start();
    let mut count = 0;
    run(Box::new(|out| count += black_box(out.len())))?;
    report(
        "fhir-mapper",
        &format!("{what} -> validated{version} resources ({count} out)"),
        inputs.len(),
        started,
    );
    Ok(outputs)
}

/// The publisher's step: decode, parse and hash (the publisher's own `item_of`), build the
/// transaction Bundle (100 per Bundle) and serialize it, HTTP excluded. `version` names the FHIR version in the report.
fn publisher_step(
    rt: &tokio::runtime::Runtime,
    codec: &Codec,
    resources: &[Vec<u8>],
    version: &str,
) -> anyhow::Result<()> {
    let started = Clock::start();
    rt.block_on(async {
        let mut items = Vec::new();
        for bytes in resources {
            let r: FhirResource = codec.decode(bytes).await?;
            items.push(
                publisher::item_of(&r, publisher::bundle::UpsertMode::Put)
                    .map_err(anyhow::Error::msg)?,
            );
            if items.len() == 100 {
                let refs: Vec<&publisher::bundle::Item> = items.iter().collect();
                let b = publisher::bundle::transaction_bundle(
                    &refs,
                    publisher::bundle::UpsertMode::Put,
                    &Default::default(),
                )
                .map_err(anyhow::Error::msg)?;
                black_box(serde_json::to_vec(&b)?);
                items.clear();
            }
        }
        anyhow::Ok(())
    })?;
    report(
        "publisher",
        &format!("resource{version} -> transaction Bundle entry (HTTP excluded)"),
        resources.len(),
        started,
    );
    Ok(())
}

/// Where a resource's time goes in the publisher's step, part by part, in µs per resource:
/// decode, `item_of` (hash and parse), the transaction Bundle (100 per Bundle, tags set) and
/// its serialization.
fn publisher_breakdown(
    rt: &tokio::runtime::Runtime,
    codec: &Codec,
    resources: &[Vec<u8>],
) -> anyhow::Result<()> {
    let mut parts = [0f64; 4];
    for chunk in resources.chunks(100) {
        let t = Instant::now();
        let mut records = Vec::with_capacity(chunk.len());
        rt.block_on(async {
            for bytes in chunk {
                records.push(codec.decode::<FhirResource>(bytes).await?);
            }
            anyhow::Ok(())
        })?;
        parts[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let items = records
            .iter()
            .map(|r| publisher::item_of(r, publisher::bundle::UpsertMode::Put))
            .collect::<Result<Vec<_>, String>>()
            .map_err(anyhow::Error::msg)?;
        parts[1] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let refs: Vec<&publisher::bundle::Item> = items.iter().collect();
        let bundle = publisher::bundle::transaction_bundle(
            &refs,
            publisher::bundle::UpsertMode::Put,
            &Default::default(),
        )
        .map_err(anyhow::Error::msg)?;
        parts[2] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        black_box(serde_json::to_vec(&bundle)?);
        parts[3] += t.elapsed().as_secs_f64();
    }
    let [decode, item, bundle, serialize] = parts.map(|p| p * 1e6 / resources.len() as f64);
    println!(
        "{:<18} {:<58} decode {decode:.2}, item_of {item:.2}, bundle {bundle:.2}, serialize {serialize:.2}",
        "publisher", "resource: µs per part"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let codec = Codec::embedded()?;
    let n = 20_000usize;

    // webhook-gateway: parse and validate a notification body, encode the SyncRequest.
    let withings = ohx_providers::withings::Withings::new(Default::default())?;
    let started = Clock::start();
    rt.block_on(async {
        for i in 0..n {
            let body = format!(
                "userid=4242&appli=4&startdate={}&enddate={}",
                1_790_000_000 + i,
                1_790_000_100 + i
            );
            let notices = withings
                .parse_webhook(Some("application/x-www-form-urlencoded"), body.as_bytes())
                .map_err(anyhow::Error::new)?;
            let x = &notices[0];
            let req = SyncRequest {
                context: ctx(),
                categories: x.categories.clone(),
                window_start: x.window.map(|w| w.0),
                window_end: x.window.map(|w| w.1),
                provider_event: None,
            };
            black_box(codec.encode(topic::SYNC_REQUESTS, &req).await?);
        }
        anyhow::Ok(())
    })?;
    report(
        "webhook-gateway",
        "notification -> SyncRequest (Avro)",
        n,
        started,
    );

    // fetcher: provider JSON -> Measurements (Avro), for blood-pressure groups (3 measures,
    // one panel) and Body Cardio weigh-ins (10 types of one group, each its own data type).
    let bp_group = |g: i64| {
        json!({"grpid": 5_000_000 + g, "attrib": 0, "date": 1_790_000_000 + g * 60, "created": 1_790_000_100, "modified": 1_790_000_100,
               "category": 1, "deviceid": "bpm", "hash_deviceid": "bpm", "modelid": 45, "model": "BPM Connect", "comment": null,
               "measures": [{"value": 12100, "type": 10, "unit": -2}, {"value": 80, "type": 9, "unit": 0}, {"value": 7200, "type": 11, "unit": -2}]})
    };
    let body_group = |g: i64| {
        let m = |value: i64, ty: i64, unit: i64| json!({"value": value, "type": ty, "unit": unit});
        json!({"grpid": 6_000_000 + g, "attrib": 0, "date": 1_790_000_000 + g * 60, "created": 1_790_000_100, "modified": 1_790_000_100,
               "category": 1, "deviceid": "scale", "hash_deviceid": "scale", "modelid": 6, "model": "Body Cardio", "comment": null,
               "measures": [m(500_000, 1, -4), m(180, 4, -2), m(41_250, 5, -3), m(1750, 6, -2), m(8750, 8, -3),
                            m(3910, 76, -2), m(2805, 77, -2), m(205, 88, -2), m(712, 91, -2), m(64, 11, 0)]})
    };
    for (label, group) in [
        (
            "getmeas JSON (BP) -> Measurements (Avro), per measurement",
            &bp_group as &dyn Fn(i64) -> serde_json::Value,
        ),
        (
            "getmeas JSON (body composition) -> Measurements (Avro)",
            &body_group,
        ),
    ] {
        let groups: Vec<serde_json::Value> = (0..100).map(group).collect();
        let page = json!({"status": 0, "body": {"updatetime": 1_790_000_200, "timezone": "Europe/Berlin", "measuregrps": groups, "more": 0, "offset": 0}});
        let page_text = page.to_string();
        let rounds = 100;
        let started = Clock::start();
        let mut produced = 0usize;
        rt.block_on(async {
            for _ in 0..rounds {
                let v: serde_json::Value = serde_json::from_str(&page_text)?;
                let resp = ohx_providers::withings::client::MeasureResponse {
                    updatetime: v["body"]["updatetime"].as_i64(),
                    timezone: v["body"]["timezone"].as_str().map(str::to_string),
                    measuregrps: serde_json::from_value(v["body"]["measuregrps"].clone())?,
                };
                let out = ohx_providers::withings::normalize::normalize_measures(
                    &resp,
                    &ctx(),
                    withings.table(),
                    &Default::default(),
                    None,
                );
                for m in &out.measurements {
                    black_box(codec.encode(topic::MEASUREMENTS, m).await?);
                    produced += 1;
                }
            }
            anyhow::Ok(())
        })?;
        report("fetcher", label, produced, started);
    }

    // fetcher, Withings ECG: a `v2/heart get` answer (9000 samples) parsed, normalized with
    // its `list` item, encoded.
    {
        let rule = withings
            .table()
            .heart("ecg_recording")
            .ok_or_else(|| anyhow::anyhow!("no ECG rule"))?
            .clone();
        let item = json!({"deviceid": "sw-1", "model": 94, "ecg": {"signalid": 557_124_430, "afib": 0},
            "heart_rate": 71, "timestamp": 1_790_000_000, "modified": 1_790_000_040});
        let answers: Vec<String> = (0..200)
            .map(|i| json!({"status": 0, "body": {"signal": ecg_signal(i), "sampling_frequency": 300, "wearposition": 3}}).to_string())
            .collect();
        let recording: ohx_providers::withings::client::HeartRecording =
            serde_json::from_value(item)?;
        let started = Clock::start();
        let mut produced = 0usize;
        rt.block_on(async {
            for _ in 0..5 {
                for text in &answers {
                    let v: serde_json::Value = serde_json::from_str(text)?;
                    let signal: ohx_providers::withings::client::HeartSignal =
                        serde_json::from_value(v["body"].clone())?;
                    let out = ohx_providers::withings::normalize::normalize_ecg(
                        &[(recording.clone(), signal)],
                        &ctx(),
                        &rule,
                        &Default::default(),
                        None,
                    );
                    for m in &out.measurements {
                        black_box(codec.encode(topic::MEASUREMENTS, m).await?);
                        produced += 1;
                    }
                }
            }
            anyhow::Ok(())
        })?;
        report(
            "fetcher",
            "Withings heart get (9000 samples) -> ECG Measurement",
            produced,
            started,
        );
    }

    // fetcher, Omron: a /api/measurement page of 100 blood-pressure items (panel + pulse each).
    let omron_table = ohx_providers::omron::normalize::FieldTable::builtin()?;
    let omron_items: Vec<serde_json::Value> = (0..100)
        .map(|i| {
            json!({"id": 9_000_000 + i, "dateTime": format!("2026-03-01T{:02}:{:02}:00", i / 60, i % 60),
                   "dateTimeLocal": format!("2026-03-01T{:02}:{:02}:00", i / 60, i % 60), "dateTimeUtcOffset": "+01:00",
                   "systolic": 128, "diastolic": 82, "bloodPressureUnits": "mmHg", "pulse": 67, "pulseUnits": "bpm",
                   "irregularHB": 0, "deviceType": "HEM-7600T"})
        })
        .collect();
    let omron_page =
        json!({"status": 0, "result": {"truncated": false, "bloodPressure": omron_items}})
            .to_string();
    let started = Clock::start();
    let mut produced = 0usize;
    rt.block_on(async {
        for _ in 0..100 {
            let page =
                ohx_providers::omron::client::decode_page(omron_page.as_bytes(), "bloodPressure")
                    .map_err(anyhow::Error::new)?;
            let out = ohx_providers::omron::normalize::normalize(
                "bloodpressure",
                &omron_table.types["bloodpressure"],
                &page.items,
                &ctx(),
                &Default::default(),
            );
            for m in &out.measurements {
                black_box(codec.encode(topic::MEASUREMENTS, m).await?);
                produced += 1;
            }
        }
        anyhow::Ok(())
    })?;
    report(
        "fetcher",
        "Omron JSON (BP) -> Measurements (Avro), per measurement",
        produced,
        started,
    );

    // fetcher, Google Health: a reconcile page of 1,000 heart-rate samples (proto3 JSON, int64
    // strings) -> hourly Measurements.
    let gh_table = ohx_providers::google_health::normalize::DataTypeTable::builtin()?;
    let gh_points: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            json!({"heartRate": {"sampleTime": {"physicalTime": format!("2026-08-29T{:02}:{:02}:{:02}Z", i / 3600, (i / 60) % 60, i % 60),
                   "utcOffset": "19800s"}, "beatsPerMinute": (60 + i % 40).to_string()}})
        })
        .collect();
    let gh_page = json!({"dataPoints": gh_points}).to_string();
    let started = Clock::start();
    let mut produced = 0usize;
    rt.block_on(async {
        for _ in 0..20 {
            let page = ohx_providers::google_health::client::decode_page(
                gh_page.as_bytes(),
                ohx_providers::google_health::normalize::Method::Reconcile,
            )
            .map_err(anyhow::Error::new)?;
            let out = ohx_providers::google_health::normalize::normalize(
                "heart-rate",
                &page.items,
                &ctx(),
                &gh_table,
                &Default::default(),
            );
            for m in &out.measurements {
                black_box(codec.encode(topic::MEASUREMENTS, m).await?);
                produced += 1;
            }
        }
        anyhow::Ok(())
    })?;
    report(
        "fetcher",
        "Google Health reconcile JSON (heart rate) -> Measurements",
        produced,
        started,
    );

    // gateway, Beurer: a HealthManager Pro export of 1,000 weigh-ins (6 values each).
    let mut export = String::from(
        "\"User details\"\n\"Name\";\"Bench\"\n\n\"Category\"\n\"Weight\"\n\nDate;Time;kg;BMI;Body fat;Water;Muscles;Bones;Medication;Comment\n",
    );
    for i in 0..1000 {
        export.push_str(&format!(
            "\"2022-{:02}-{:02}\";\"{:02}:{:02}\";\"62.5\";\"21.4\";\"15.8\";\"57.8\";\"43.7\";\"2.8\";\"\";\"\"\n",
            1 + i / 280,
            1 + (i / 10) % 28,
            6 + i % 10,
            i % 60
        ));
    }
    let started = Clock::start();
    let mut produced = 0usize;
    rt.block_on(async {
        for _ in 0..20 {
            let parsed =
                ohx_providers::beurer::parse_export(export.as_bytes(), &ctx(), "Europe/Berlin")
                    .map_err(anyhow::Error::new)?;
            for m in parsed.imported.iter().flat_map(|r| &r.measurements) {
                black_box(codec.encode(topic::MEASUREMENTS, m).await?);
                produced += 1;
            }
        }
        anyhow::Ok(())
    })?;
    report(
        "webhook-gateway",
        "Beurer CSV (weight) -> Measurements (Avro), per measurement",
        produced,
        started,
    );

    // hourly-aggregator: decode a sample, add it to its window; closes and encodes aggregates.
    let series: Vec<String> = (0..50).map(|s| format!("patient-{s}/heart_rate")).collect();
    let mut encoded = Vec::new();
    rt.block_on(async {
        for i in 0..(n as i64) {
            encoded.push(
                codec
                    .encode(topic::MEASUREMENTS, &hr(i / 50, &series[(i % 50) as usize]))
                    .await?,
            );
        }
        anyhow::Ok(())
    })?;
    // As the stage runs it: each batch of 500 on a copy-on-write clone, kept once acknowledged.
    let mut windows = PartitionWindows::new(WindowConfig::default());
    let now = 1_790_000_000_000 + 30 * 24 * HOUR;
    let mut aggregates = 0usize;
    let started = Clock::start();
    rt.block_on(async {
        for (batch_index, batch) in encoded.chunks(500).enumerate() {
            let mut next = windows.clone();
            for (i, bytes) in batch.iter().enumerate() {
                let offset = (batch_index * 500 + i) as i64;
                let m: Measurement = codec.decode(bytes).await?;
                let outcome = next.on_sample(offset, &m, now);
                if let Some(e) = outcome.rejected {
                    anyhow::bail!("{e}");
                }
                for a in outcome.closed {
                    black_box(codec.encode(topic::HOURLY_AGGREGATES, &a).await?);
                    aggregates += 1;
                }
            }
            windows = next;
        }
        anyhow::Ok(())
    })?;
    report(
        "hourly-aggregator",
        &format!("sample -> window ({aggregates} aggregates closed)"),
        n,
        started,
    );

    // Memory per open series-hour (60 samples each), from the process's resident set.
    let before = rss_bytes();
    let mut held = PartitionWindows::new(WindowConfig::default());
    let series_hours = 5_000i64;
    for s in 0..series_hours {
        let key = format!("patient-{s}/heart_rate");
        for minute in 0..60 {
            let mut m = hr(minute, &key);
            m.fetched_through = None;
            let outcome = held.on_sample(s * 60 + minute, &m, now);
            if let Some(e) = outcome.rejected {
                anyhow::bail!("{e}");
            }
        }
    }
    let after = rss_bytes();
    println!(
        "{:<18} {:<58} {:>10.0} bytes per open series-hour ({} windows, {} samples)",
        "hourly-aggregator",
        "memory, 60 samples per series-hour",
        (after.saturating_sub(before)) as f64 / series_hours as f64,
        held.open_windows(),
        held.held_samples()
    );
    drop(held);

    // fhir-mapper: decode, map, validate (R5 schema + profile rules), encode.
    let table = Mapping::default_table()?;
    let settings = MapperSettings::new("https://ohx.example/fhir")?;
    let bps: Vec<Vec<u8>> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..50_000 {
            v.push(codec.encode(topic::MEASUREMENTS, &bp(i)).await?);
        }
        anyhow::Ok(v)
    })?;
    // As the stage runs it: decode a batch of 500, process it, apply the change.
    let core = std::sync::Arc::new(MapperCore::new(
        table.clone(),
        settings.clone(),
        R4Rules::default_rules()?,
    )?);
    // Its outputs are the inputs of the next stages.
    let resources = mapper_step(&rt, &codec, &core, &bps, ("BP Measurement", ""))?;
    mapper_breakdown(&rt, &codec, &core, &bps)?;
    // The same measurements for a target that speaks R4: rewritten, validated against R4.
    let bps_r4: Vec<Vec<u8>> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..50_000 {
            let mut m = bp(i);
            m.context.fhir_version = ohx_common::records::FHIR_R4.into();
            v.push(codec.encode(topic::MEASUREMENTS, &m).await?);
        }
        anyhow::Ok(v)
    })?;
    let resources_r4 = mapper_step(&rt, &codec, &core, &bps_r4, ("BP Measurement", " R4"))?;
    // ECG recordings: the waveform written as SampledData (9000 samples), the linked heart
    // rate and the DiagnosticReport, each validated (R5, then R4). Samples per second = 9000 ×
    // records per second.
    for (version, fhir_version) in [
        ("", ohx_common::records::FHIR_R5),
        (" R4", ohx_common::records::FHIR_R4),
    ] {
        let ecgs: Vec<Vec<u8>> = rt.block_on(async {
            let mut v = Vec::new();
            for i in 0..2_000 {
                let mut m = ecg(i);
                m.context.fhir_version = fhir_version.into();
                v.push(codec.encode(topic::MEASUREMENTS, &m).await?);
            }
            anyhow::Ok(v)
        })?;
        mapper_step(
            &rt,
            &codec,
            &core,
            &ecgs,
            ("ECG Measurement (9000 samples)", version),
        )?;
    }
    let agg = HourlyAggregate {
        context: ctx(),
        aggregate_id: "a".into(),
        series_key: "p/heart_rate".into(),
        data_type: "heart_rate".into(),
        unit: "/min".into(),
        hour_start: 1_789_999_200_000,
        hour_end: 1_789_999_200_000 + HOUR,
        count: 60,
        min: 55.0,
        max: 99.0,
        mean: 71.3,
        sum: 4278.0,
        first_sample_at: 1_789_999_200_000,
        last_sample_at: 1_789_999_200_000 + 59 * 60_000,
        utc_offset_seconds: Some(3600),
        device: None,
        revision: 0,
        amends: false,
    };
    let started = Clock::start();
    for _ in 0..50_000 {
        for r in map_aggregate(&agg, &core.table, &core.settings)? {
            core.validator
                .validate_all(&r.json)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            black_box(canonical_json(&r.json));
        }
    }
    report(
        "fhir-mapper",
        "HourlyAggregate -> validated Observation",
        50_000,
        started,
    );

    // deduplicator: decode, hash, decide, encode outbox + changelog.
    let mut state: HashMap<String, deduplicator::Seen> = HashMap::new();
    let started = Clock::start();
    let mut forwarded = 0usize;
    rt.block_on(async {
        for bytes in &resources {
            let r: FhirResource = codec.decode(bytes).await?;
            let hash = content_hash(&r.resource)?;
            if let deduplicator::Decision::Forward =
                deduplicator::decide(state.get(&r.identity), r.source_revision, &hash)
            {
                state.insert(
                    r.identity.clone(),
                    deduplicator::Seen {
                        revision: r.source_revision,
                        hash: hash.clone(),
                    },
                );
                black_box(codec.encode(topic::FHIR_OUTBOX, &r).await?);
                black_box(
                    codec
                        .encode(
                            topic::DEDUP_STATE,
                            &ohx_common::records::DedupState {
                                content_hash: hash,
                                revision: r.source_revision,
                            },
                        )
                        .await?,
                );
                forwarded += 1;
            }
        }
        anyhow::Ok(())
    })?;
    report(
        "deduplicator",
        &format!("resource -> hash, decide, outbox ({forwarded} forwarded)"),
        resources.len(),
        started,
    );

    publisher_step(&rt, &codec, &resources, "")?;
    publisher_breakdown(&rt, &codec, &resources)?;
    publisher_step(&rt, &codec, &resources_r4, " (R4)")?;
    let _ = BTreeMap::<i32, i32>::new();
    Ok(())
}
