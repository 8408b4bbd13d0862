//! End-to-end scenario of a patient whose data goes to two EHR targets of one organization:
//! the stack's hfs, and a second hfs that is down when the data arrives. Part of the `e2e`
//! test binary (`tests/e2e.rs`).

use super::{Env, HOUR, bp_group, bpm, hour_floor};
use anyhow::{Context as _, ensure};
use chrono::Utc;
use ohx_tests::kafka_util::wait_settled;
use ohx_tests::stack::free_port;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Observations of `reference` in the FHIR server at `base`, by id.
async fn observations(
    env: &Env,
    base: &str,
    reference: &str,
) -> anyhow::Result<BTreeMap<String, Value>> {
    let bundle: Value = env
        .http
        .get(format!("{base}/Observation?subject={reference}&_count=200"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|x| {
                    let r = x["resource"].clone();
                    (r["id"].as_str().unwrap_or_default().to_owned(), r)
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Waits until `reference` has `n` Observations at `base`.
async fn wait_observations(
    env: &Env,
    base: &str,
    reference: &str,
    n: usize,
) -> anyhow::Result<BTreeMap<String, Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let found = observations(env, base, reference).await?;
        if found.len() >= n {
            ensure!(
                found.len() == n,
                "{} observations, expected {n}",
                found.len()
            );
            return Ok(found);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{reference} at {base}: {} observations, expected {n}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Two EHRs hold the same Observations (ids, status, codes, values, times), each addressed
/// to the patient as that EHR knows them: `(observations by id, patient reference)` per side.
fn same_observations(
    a: (&BTreeMap<String, Value>, &str),
    b: (&BTreeMap<String, Value>, &str),
) -> anyhow::Result<()> {
    ensure!(
        a.0.keys().eq(b.0.keys()),
        "ids differ: {:?} / {:?}",
        a.0.keys(),
        b.0.keys()
    );
    for (id, x) in a.0 {
        let y = &b.0[id];
        ensure!(x["subject"]["reference"] == a.1, "{id}: {x}");
        ensure!(y["subject"]["reference"] == b.1, "{id}: {y}");
        for field in [
            "status",
            "code",
            "valueQuantity",
            "component",
            "effectiveDateTime",
            "effectivePeriod",
        ] {
            ensure!(
                x[field] == y[field],
                "{id}: {field} differs: {} / {}",
                x[field],
                y[field]
            );
        }
    }
    Ok(())
}

/// `ohx create-target` in the scenarios' organization: `name` at `base`, with `extra`
/// options; returns its id.
async fn create_target(
    env: &Env,
    name: &str,
    base: &str,
    extra: &[&str],
) -> anyhow::Result<String> {
    let mut args = vec![
        "create-target",
        "--org",
        &env.org,
        "--name",
        name,
        "--base-url",
        base,
    ];
    args.extend_from_slice(extra);
    env.stack.lock().await.ohx_id(&args).await
}

/// Creates `reference` (`Patient/{id}`) on the FHIR server at `base`.
async fn create_patient(env: &Env, base: &str, reference: &str) -> anyhow::Result<()> {
    let id = reference
        .strip_prefix("Patient/")
        .context("a Patient reference")?;
    let r = env
        .http
        .put(format!("{base}/{reference}"))
        .header("Content-Type", "application/fhir+json")
        .json(&json!({"resourceType": "Patient", "id": id, "active": true}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "create Patient: {}", r.status());
    Ok(())
}

/// Withings user `userid` measures a blood pressure with its pulse (group `grpid`, cuff
/// `bpm-{userid}`) 10 minutes into hour `h`, and a watch (`watch-{userid}`) records the heart
/// rate of every minute of that hour (pattern `hr_seed`); both are notified. Three
/// Observations result: the panel, the pulse and the hourly heart rate.
async fn measure_bp_and_hour(
    env: &Env,
    userid: i64,
    grpid: i64,
    h: i64,
    hr_seed: i64,
    bp: (i64, i64, i64),
) -> anyhow::Result<()> {
    env.add_groups(
        userid,
        json!([bp_group(
            grpid,
            h + 600_000,
            &format!("bpm-{userid}"),
            (bp.0, -2),
            (bp.1, -2),
            (bp.2, -2)
        )]),
    )
    .await?;
    let mut series = serde_json::Map::new();
    for m in 0..60 {
        series.insert(
            ((h + m * 60_000) / 1000).to_string(),
            json!({"deviceid": format!("watch-{userid}"), "model": "ScanWatch", "model_id": 93,
                   "heart_rate": bpm(hr_seed, m)}),
        );
    }
    env.add_intraday(userid, Value::Object(series)).await?;
    env.notify(userid, 4, h, h + HOUR).await?;
    env.notify(userid, 16, h, h + HOUR - 1000).await
}

/// `ohx add-delivery`: the patient's data to `target` as well, as `reference`.
async fn add_delivery(
    env: &Env,
    patient: &str,
    target: &str,
    reference: &str,
) -> anyhow::Result<Vec<Value>> {
    env.stack
        .lock()
        .await
        .ohx(&[
            "add-delivery",
            "--patient",
            patient,
            "--target",
            target,
            "--reference",
            reference,
        ])
        .await
}

/// The patient's own target (the stack's hfs) gets a blood pressure, its pulse and an hourly
/// heart rate while the second target's server is down; the second target holds its records
/// without delaying the first; once its server is up it gets the same Observations, addressed
/// to the patient as that EHR knows them, each resource once (version 1 on both sides).
///
/// The scenarios share one pipeline: should this one fail before the second server is up, it
/// is started anyway, so the held records drain and the scenarios after it can settle.
pub async fn patient_delivered_to_two_targets(env: Arc<Env>) -> anyhow::Result<()> {
    let port = free_port()?;
    let mut started = false;
    let outcome = two_targets(&env, port, &mut started).await;
    if outcome.is_err() && !started {
        env.stack
            .lock()
            .await
            .start_hfs_on("hfs-second", port, &[])
            .await?;
    }
    outcome
}

/// The body of [`patient_delivered_to_two_targets`]; `started` tells whether the second
/// server was started.
async fn two_targets(env: &Arc<Env>, port: u16, started: &mut bool) -> anyhow::Result<()> {
    let second_base = format!("http://127.0.0.1:{port}");
    let second = create_target(env, "second ehr", &second_base, &[]).await?;
    let p = env.new_patient(5301).await?;
    let second_ref = "Patient/second-5301";
    let added = add_delivery(env, &p.patient_id, &second, second_ref).await?;
    let listed: Vec<(&str, &str)> = added[0]["deliveries"]
        .as_array()
        .context("deliveries")?
        .iter()
        .map(|d| {
            (
                d["ehr_target_id"].as_str().unwrap_or_default(),
                d["patient_reference"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    ensure!(
        listed
            == [
                (env.target.as_str(), p.reference.as_str()),
                (second.as_str(), second_ref)
            ],
        "deliveries: {listed:?}"
    );
    // The patient's own target cannot be added a second time.
    let again = add_delivery(env, &p.patient_id, &env.target, "Patient/other").await;
    ensure!(again.is_err(), "the own target was added again: {again:?}");

    let h = hour_floor(Utc::now().timestamp_millis()) - 5 * HOUR;
    measure_bp_and_hour(env, p.userid, 930_101, h, 4, (12500, 8000, 6600)).await?;

    // The own target gets everything while the second is down and holds its records.
    let first_base = env.stack.lock().await.fhir_base.clone();
    wait_observations(env, &first_base, &p.reference, 3).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let targets = env.stack.lock().await.ohx(&["targets"]).await?;
        let held = targets
            .iter()
            .find(|t| t["id"] == second.as_str())
            .and_then(|t| t["held"].as_i64())
            .unwrap_or(0);
        if held > 0 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the second target holds nothing while its server is down: {targets:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The second EHR comes up, with the patient as it knows them.
    env.stack
        .lock()
        .await
        .start_hfs_on("hfs-second", port, &[])
        .await?;
    *started = true;
    create_patient(env, &second_base, second_ref).await?;
    let second_obs = wait_observations(env, &second_base, second_ref, 3).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;

    // The same Observations on both sides, each addressed to its EHR's patient, version 1.
    let first = observations(env, &first_base, &p.reference).await?;
    same_observations((&first, &p.reference), (&second_obs, second_ref))?;
    for (side, obs) in [("first", &first), ("second", &second_obs)] {
        for (id, r) in obs {
            ensure!(
                r["meta"]["versionId"] == "1",
                "{id} on the {side} EHR has version {}",
                r["meta"]["versionId"]
            );
        }
    }

    // Removed, the second target is no longer listed.
    let removed = env
        .stack
        .lock()
        .await
        .ohx(&[
            "remove-delivery",
            "--patient",
            &p.patient_id,
            "--target",
            &second,
        ])
        .await?;
    ensure!(
        removed[0]["deliveries"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "after remove-delivery: {removed:?}"
    );
    Ok(())
}

/// `GET {base}/{path}` as JSON.
async fn get_json(env: &Env, base: &str, path: &str) -> anyhow::Result<Value> {
    Ok(env
        .http
        .get(format!("{base}/{path}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// The resources of `resource_type` at `base`.
async fn all_of(env: &Env, base: &str, resource_type: &str) -> anyhow::Result<Vec<Value>> {
    let bundle = get_json(env, base, &format!("{resource_type}?_count=200")).await?;
    Ok(bundle["entry"]
        .as_array()
        .map(|e| e.iter().map(|x| x["resource"].clone()).collect())
        .unwrap_or_default())
}

/// A target in conditional mode (a server that assigns its own ids: ohx sends none) gets a
/// blood pressure with its pulse and an hourly heart rate from two devices. On that server
/// every resource has the server's id, every Observation's and DeviceAssociation's `device`
/// points at the server's Device with that identifier, and a re-fetch of the same data
/// creates no resource and no version.
pub async fn conditional_target_keeps_references(env: Arc<Env>) -> anyhow::Result<()> {
    let port = free_port()?;
    let base = env
        .stack
        .lock()
        .await
        .start_hfs_on("hfs-conditional", port, &[])
        .await?;
    let target = create_target(&env, "server ids", &base, &["--mode", "conditional"]).await?;
    let p = env.new_patient(5302).await?;
    let reference = "Patient/cond-5302";
    add_delivery(&env, &p.patient_id, &target, reference).await?;
    create_patient(&env, &base, reference).await?;

    let h = hour_floor(Utc::now().timestamp_millis()) - 5 * HOUR;
    measure_bp_and_hour(&env, p.userid, 930_201, h, 5, (12600, 8100, 6700)).await?;
    let obs = wait_observations(&env, &base, reference, 3).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;

    // The server's ids, not ohx's; each device reference is the server's Device of that
    // identifier.
    let own_ids = observations(
        &env,
        &env.stack.lock().await.fhir_base.clone(),
        &p.reference,
    )
    .await?
    .into_keys()
    .collect::<Vec<_>>();
    ensure!(own_ids.len() == 3, "own target: {own_ids:?}");
    let devices = all_of(&env, &base, "Device").await?;
    let associations = all_of(&env, &base, "DeviceAssociation").await?;
    ensure!(devices.len() == 2, "{} Devices", devices.len());
    ensure!(
        associations.len() == 2,
        "{} DeviceAssociations",
        associations.len()
    );
    let referencing = obs.values().chain(associations.iter());
    for r in referencing {
        let id = r["id"].as_str().unwrap_or_default();
        ensure!(!own_ids.iter().any(|o| o == id), "{id} is ohx's id");
        let device_ref = r["device"]["reference"].as_str().context("device")?;
        ensure!(
            !device_ref.starts_with("urn:") && !device_ref.contains('?'),
            "{id}: device reference {device_ref} was not resolved"
        );
        let device = get_json(&env, &base, device_ref).await?;
        ensure!(
            device["identifier"][0] == r["device"]["identifier"],
            "{id}: {device_ref} is {} but the reference names {}",
            device["identifier"][0],
            r["device"]["identifier"]
        );
    }

    // The same data fetched again: nothing new on the server.
    env.notify(p.userid, 4, h, h + HOUR).await?;
    env.notify(p.userid, 16, h, h + HOUR - 1000).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    let again = observations(&env, &base, reference).await?;
    ensure!(
        again.keys().eq(obs.keys()),
        "Observations changed: {again:?}"
    );
    for (kind, now, before) in [
        ("Device", all_of(&env, &base, "Device").await?, &devices),
        (
            "DeviceAssociation",
            all_of(&env, &base, "DeviceAssociation").await?,
            &associations,
        ),
    ] {
        ensure!(now.len() == before.len(), "{kind}: {} now", now.len());
    }
    for r in again
        .values()
        .chain(all_of(&env, &base, "Device").await?.iter())
    {
        ensure!(
            r["meta"]["versionId"] == "1",
            "{} {} has version {}",
            r["resourceType"],
            r["id"],
            r["meta"]["versionId"]
        );
    }
    Ok(())
}

/// A target that speaks R4 on a real R4 server (hfs serving FHIR 4.0.1, validation enforced)
/// gets a blood pressure with its pulse and an hourly heart rate from two devices, written as
/// R4: the server accepts every resource; the Observations carry the same ids, codes, values
/// and times as on the patient's own (R5) target; each Device names the patient (R4 has no
/// DeviceAssociation) under its R4 `deviceName`; every device reference resolves on the R4
/// server; and a re-fetch of the same data makes no new version.
pub async fn r4_target_on_an_r4_server(env: Arc<Env>) -> anyhow::Result<()> {
    let port = free_port()?;
    let base = env
        .stack
        .lock()
        .await
        .start_hfs_on("hfs-r4", port, &[("HFS_DEFAULT_FHIR_VERSION", "R4".into())])
        .await?;
    let metadata = get_json(&env, &base, "metadata").await?;
    ensure!(
        metadata["fhirVersion"] == "4.0.1",
        "the R4 server says fhirVersion {}",
        metadata["fhirVersion"]
    );
    // It refuses what R4 does not have: R5 sent as-is would not pass.
    let r5_only = env
        .http
        .put(format!("{base}/DeviceAssociation/r5-only"))
        .header("Content-Type", "application/fhir+json")
        .json(&json!({"resourceType": "DeviceAssociation", "id": "r5-only",
                      "device": {"reference": "Device/x"}, "status": {"coding": [{"code": "implanted"}]}}))
        .send()
        .await?;
    ensure!(
        r5_only.status().is_client_error(),
        "the R4 server took an R5-only DeviceAssociation: {}",
        r5_only.status()
    );
    let target = create_target(&env, "r4 ehr", &base, &["--fhir-version", "R4"]).await?;
    let p = env.new_patient(5303).await?;
    let reference = "Patient/r4-5303";
    add_delivery(&env, &p.patient_id, &target, reference).await?;
    create_patient(&env, &base, reference).await?;

    let h = hour_floor(Utc::now().timestamp_millis()) - 5 * HOUR;
    measure_bp_and_hour(&env, p.userid, 930_301, h, 6, (12700, 8200, 6800)).await?;
    let r4 = wait_observations(&env, &base, reference, 3).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;

    // The same Observations as the own R5 target's, addressed to the R4 EHR's patient.
    let own_base = env.stack.lock().await.fhir_base.clone();
    let r5 = observations(&env, &own_base, &p.reference).await?;
    same_observations((&r4, reference), (&r5, &p.reference))?;

    // Devices in their R4 shape, each naming the patient; every reference resolves.
    let devices = all_of(&env, &base, "Device").await?;
    ensure!(
        devices.len() == 2,
        "{} Devices on the R4 server",
        devices.len()
    );
    for d in &devices {
        let id = d["id"].as_str().unwrap_or_default();
        ensure!(
            d["patient"]["reference"] == reference,
            "Device {id} names patient {}",
            d["patient"]
        );
        ensure!(
            d["deviceName"][0]["name"].is_string() && d.get("displayName").is_none(),
            "Device {id} is not in its R4 shape: {d}"
        );
    }
    for (id, o) in &r4 {
        let device_ref = o["device"]["reference"].as_str().context("device")?;
        let device = get_json(&env, &base, device_ref).await?;
        ensure!(
            device["resourceType"] == "Device",
            "{id}: {device_ref} is {device}"
        );
    }

    // The same data fetched again: no new version on the R4 server.
    env.notify(p.userid, 4, h, h + HOUR).await?;
    env.notify(p.userid, 16, h, h + HOUR - 1000).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    let again = observations(&env, &base, reference).await?;
    ensure!(
        again.keys().eq(r4.keys()),
        "Observations changed: {again:?}"
    );
    for r in again
        .values()
        .chain(all_of(&env, &base, "Device").await?.iter())
    {
        ensure!(
            r["meta"]["versionId"] == "1",
            "{} {} has version {} on the R4 server",
            r["resourceType"],
            r["id"],
            r["meta"]["versionId"]
        );
    }
    Ok(())
}
