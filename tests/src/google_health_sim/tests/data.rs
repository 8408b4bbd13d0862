//! Data API: list, filters and paging, reconcile, error envelopes, the rate limit.

use super::*;

#[tokio::test]
async fn list_filters_pages_and_keeps_the_wire_format() {
    let sim = start(SimConfig::default()).await;
    let token = sim.user(UID, None).await;

    // Empty: exactly {}.
    let resp = sim
        .http
        .get(format!(
            "{}/v4/users/me/dataTypes/steps/dataPoints",
            sim.base
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.unwrap(), "{}");

    let points: Vec<Value> = (0..5)
        .map(|i| {
            steps(
                &format!("2026-07-23T08:0{i}:00Z"),
                &format!("2026-07-23T08:0{}:00Z", i + 1),
                &format!("{}", 100 + i),
            )
        })
        .collect();
    let v = sim.seed(UID, "steps", json!(points)).await;
    assert_eq!(v, json!({ "stored": 5, "notifications": 0 }));

    // Descending by start time, served verbatim (int64 as strings).
    let (status, all) = sim.list(&token, "steps", &[]).await;
    assert_eq!(status, 200);
    let counts: Vec<&str> = all["dataPoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["steps"]["count"].as_str().unwrap())
        .collect();
    assert_eq!(counts, ["104", "103", "102", "101", "100"]);
    assert_eq!(all["dataPoints"][0], points[4]);
    assert!(all.get("nextPageToken").is_none());

    // Filter [08:01, 08:04) and pages of 2 with the token round trip.
    let filter = r#"steps.interval.start_time >= "2026-07-23T08:01:00Z" AND steps.interval.start_time < "2026-07-23T08:04:00Z""#;
    let (_, p1) = sim
        .list(&token, "steps", &[("filter", filter), ("pageSize", "2")])
        .await;
    let counts = |v: &Value| -> Vec<String> {
        v["dataPoints"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| p["steps"]["count"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(counts(&p1), ["103", "102"]);
    let tok = p1["nextPageToken"].as_str().unwrap().to_owned();
    // A point inserted before the cursor does not shift the next page.
    sim.seed(
        UID,
        "steps",
        json!([steps("2026-07-23T08:03:30Z", "2026-07-23T08:03:40Z", "7")]),
    )
    .await;
    let (_, p2) = sim
        .list(
            &token,
            "steps",
            &[("filter", filter), ("pageSize", "2"), ("pageToken", &tok)],
        )
        .await;
    assert_eq!(counts(&p2), ["101"]);
    assert!(p2.get("nextPageToken").is_none());
    // The token belongs to its query.
    let (status, err) = sim
        .list(&token, "steps", &[("pageSize", "2"), ("pageToken", &tok)])
        .await;
    assert_eq!((status, reason(&err)), (400, "INVALID_PAGE_TOKEN"));
    let (status, err) = sim
        .list(
            &token,
            "steps",
            &[("filter", filter), ("pageToken", "garbage")],
        )
        .await;
    assert_eq!((status, reason(&err)), (400, "INVALID_PAGE_TOKEN"));
    // Civil filter: 08:00Z at +02:00 is 10:00 local.
    let (_, civil) = sim
        .list(
            &token,
            "steps",
            &[(
                "filter",
                r#"steps.interval.civil_start_time >= "2026-07-23T10:03:00""#,
            )],
        )
        .await;
    assert_eq!(counts(&civil), ["104", "7", "103"]);
    // Replacement: same start, unnamed → replaced.
    sim.seed(
        UID,
        "steps",
        json!([steps("2026-07-23T08:04:00Z", "2026-07-23T08:05:00Z", "999")]),
    )
    .await;
    let (_, civil) = sim
        .list(
            &token,
            "steps",
            &[(
                "filter",
                r#"steps.interval.civil_start_time >= "2026-07-23T10:04:00""#,
            )],
        )
        .await;
    assert_eq!(counts(&civil), ["999"]);
    // Deletion by start time.
    let v = sim
        .control(
            reqwest::Method::DELETE,
            &format!("/_sim/users/{UID}/dataPoints"),
            json!({ "dataType": "steps", "startTimes": ["2026-07-23T08:03:30Z"] }),
        )
        .await;
    assert_eq!(v["deleted"], 1);

    // Errors: bad filter, numeric parent, camelCase type, unsupported action, page size.
    let (status, err) = sim
        .list(
            &token,
            "steps",
            &[(
                "filter",
                r#"steps.interval.start_time > "2026-07-23T08:01:00Z""#,
            )],
        )
        .await;
    assert_eq!(
        (status, reason(&err)),
        (400, "INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR")
    );
    assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
    let (status, _, err) = sim
        .get(
            &format!("/v4/users/{UID}/dataTypes/steps/dataPoints"),
            Some(&token),
            &[],
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        err,
        json!({ "error": { "code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT" } })
    );
    let (status, err) = sim.list(&token, "heartRate", &[]).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "INVALID_PARENT_DATA_TYPE_COLLECTION")
    );
    assert_eq!(
        err["error"]["message"],
        "Invalid data type ID referenced in the parent data type collection: heartRate"
    );
    assert_eq!(
        err["error"]["details"][1]["@type"],
        "type.googleapis.com/google.rpc.BadRequest"
    );
    let (status, err) = sim.list(&token, "floors", &[]).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "UNSUPPORTED_DATA_TYPE_ACTION")
    );
    let (status, err) = sim.list(&token, "steps", &[("pageSize", "-1")]).await;
    assert_eq!((status, reason(&err)), (400, "INVALID_PAGE_SIZE"));

    // Sample, daily and session types; NaN strings and civil times survive verbatim.
    sim.seed(
        UID,
        "heart-rate",
        json!([
            heart_rate("2026-08-29T05:29:57Z", "61"),
            heart_rate("2026-08-29T05:30:57Z", "64")
        ]),
    )
    .await;
    let (_, hr) = sim
        .list(
            &token,
            "heart-rate",
            &[(
                "filter",
                r#"heart_rate.sample_time.physical_time < "2026-08-29T05:30:00Z""#,
            )],
        )
        .await;
    assert_eq!(hr["dataPoints"].as_array().unwrap().len(), 1);
    assert_eq!(hr["dataPoints"][0]["heartRate"]["beatsPerMinute"], "61");
    let temp = json!({
        "dataSource": { "platform": "FITBIT" },
        "dailySleepTemperatureDerivations": {
            "date": { "year": 2026, "month": 8, "day": 14 },
            "nightlyTemperatureCelsius": 34.1,
            "baselineTemperatureCelsius": "NaN",
        }
    });
    sim.seed(UID, "daily-sleep-temperature-derivations", json!([temp]))
        .await;
    let (_, d) = sim
        .list(
            &token,
            "daily-sleep-temperature-derivations",
            &[("filter", r#"daily_sleep_temperature_derivations.date >= "2026-08-14" AND daily_sleep_temperature_derivations.date < "2026-08-15""#)],
        )
        .await;
    assert_eq!(d["dataPoints"][0], temp);
    let night = |id: &str, start: &str, end: &str| {
        json!({
            "name": format!("users/{UID}/dataTypes/sleep/dataPoints/{id}"),
            "dataSource": { "recordingMethod": "MANUAL", "platform": "FITBIT" },
            "sleep": {
                "interval": { "startTime": start, "startUtcOffset": "19800s",
                              "endTime": end, "endUtcOffset": "19800s" },
                "type": "STAGES",
                "stages": [{ "startTime": start, "startUtcOffset": "19800s",
                             "endTime": end, "endUtcOffset": "19800s", "type": "LIGHT" }],
                "metadata": { "processed": true, "mainSleep": true },
                "summary": { "minutesAsleep": "480", "minutesAwake": "0" },
            }
        })
    };
    sim.seed(
        UID,
        "sleep",
        json!([
            night(
                "1218857650621109392",
                "2026-08-27T17:24:00Z",
                "2026-08-28T01:24:00Z"
            ),
            night(
                "1218857650621109393",
                "2026-08-28T17:24:00Z",
                "2026-08-29T01:24:00Z"
            ),
        ]),
    )
    .await;
    let (_, s) = sim
        .list(&token, "sleep", &[("filter", r#"sleep.interval.end_time >= "2026-08-28T00:00:00Z" AND sleep.interval.end_time < "2026-08-29T00:00:00Z""#)])
        .await;
    assert_eq!(s["dataPoints"].as_array().unwrap().len(), 1);
    assert_eq!(
        s["dataPoints"][0]["name"],
        format!("users/{UID}/dataTypes/sleep/dataPoints/1218857650621109392")
    );
    // A named point replaces the stored one with the same name; get finds it.
    let mut edited = night(
        "1218857650621109392",
        "2026-08-27T17:30:00Z",
        "2026-08-28T01:24:00Z",
    );
    edited["sleep"]["metadata"]["manuallyEdited"] = json!(true);
    sim.seed(UID, "sleep", json!([edited.clone()])).await;
    let (_, s) = sim.list(&token, "sleep", &[("pageSize", "100")]).await;
    assert_eq!(s["dataPoints"].as_array().unwrap().len(), 2);
    let (status, _, got) = sim
        .get(
            "/v4/users/me/dataTypes/sleep/dataPoints/1218857650621109392",
            Some(&token),
            &[],
        )
        .await;
    assert_eq!((status, got), (200, edited));
    let (status, _, err) = sim
        .get(
            "/v4/users/me/dataTypes/sleep/dataPoints/nope",
            Some(&token),
            &[],
        )
        .await;
    assert_eq!((status, reason(&err)), (404, "RESOURCE_NOT_FOUND"));

    let stats = sim.stats().await;
    // Calls rejected before the data type was resolved and checked do not count.
    assert_eq!(stats["users"][UID]["by_data_type"]["steps"], 10);
}

#[tokio::test]
async fn reconcile_strips_sources_and_honours_families() {
    let sim = start(SimConfig::default()).await;
    let token = sim.user(UID, None).await;
    let mut phone = steps("2026-07-23T09:00:00Z", "2026-07-23T09:01:00Z", "40");
    phone["dataSource"] =
        json!({ "platform": "HEALTH_CONNECT", "device": { "formFactor": "PHONE" } });
    let weight = json!({
        "name": format!("users/{UID}/dataTypes/weight/dataPoints/w1"),
        "dataSource": { "recordingMethod": "MANUAL", "platform": "FITBIT" },
        "weight": {
            "sampleTime": {
                "physicalTime": "2026-09-09T01:24:33.390135Z", "utcOffset": "-18000s",
                "civilTime": { "date": { "year": 2026, "month": 9, "day": 8 },
                               "time": { "hours": 20, "minutes": 24, "seconds": 33, "nanos": 390135000 } }
            },
            "weightGrams": 79832
        }
    });
    sim.seed(
        UID,
        "steps",
        json!([
            steps("2026-07-23T08:00:00Z", "2026-07-23T08:01:00Z", "125"),
            phone
        ]),
    )
    .await;
    sim.seed(UID, "weight", json!([weight])).await;
    let reconcile = |t: &'static str, q: Vec<(&'static str, &'static str)>| {
        let (sim, token) = (&sim, token.clone());
        async move {
            let (s, _, v) = sim
                .get(
                    &format!("/v4/users/me/dataTypes/{t}/dataPoints:reconcile"),
                    Some(&token),
                    &q,
                )
                .await;
            (s, v)
        }
    };
    let (status, all) = reconcile("steps", vec![]).await;
    assert_eq!(status, 200);
    assert_eq!(
        all,
        json!({ "dataPoints": [
            { "steps": { "interval": { "startTime": "2026-07-23T09:00:00Z", "startUtcOffset": "7200s",
                "endTime": "2026-07-23T09:01:00Z", "endUtcOffset": "7200s" }, "count": "40" } },
            { "steps": { "interval": { "startTime": "2026-07-23T08:00:00Z", "startUtcOffset": "7200s",
                "endTime": "2026-07-23T08:01:00Z", "endUtcOffset": "7200s" }, "count": "125" } },
        ]})
    );
    let (_, wear) = reconcile(
        "steps",
        vec![(
            "dataSourceFamily",
            "users/me/dataSourceFamilies/google-wearables",
        )],
    )
    .await;
    assert_eq!(wear["dataPoints"].as_array().unwrap().len(), 1);
    assert_eq!(wear["dataPoints"][0]["steps"]["count"], "125");
    let (status, err) = reconcile("steps", vec![("dataSourceFamily", "phones")]).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "INVALID_DATA_POINT_DATA_SOURCE_FAMILY")
    );
    let (_, w) = reconcile("weight", vec![]).await;
    assert_eq!(
        w["dataPoints"][0]["dataPointName"],
        format!("users/{UID}/dataTypes/weight/dataPoints/w1")
    );
    assert!(w["dataPoints"][0].get("dataSource").is_none());
    assert!(w["dataPoints"][0].get("name").is_none());
    assert_eq!(w["dataPoints"][0]["weight"]["weightGrams"], 79832);
    let (status, err) = reconcile("electrocardiogram", vec![]).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "UNSUPPORTED_DATA_TYPE_ACTION")
    );
    let (status, _) = reconcile("heartRate", vec![]).await;
    assert_eq!(status, 400);
    let (_, empty) = reconcile("sleep", vec![]).await;
    assert_eq!(empty, json!({}));
}

#[tokio::test]
async fn unauthenticated_envelopes() {
    let sim = start(SimConfig::default()).await;
    let token = sim.user(UID, None).await;
    let expect = |reason: &str, message: &str| {
        json!({ "error": {
            "code": 401,
            "message": message,
            "status": "UNAUTHENTICATED",
            "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {
                    "service": "health.googleapis.com",
                    "method": "google.devicesandservices.health.v4.DataPointsService.ListDataPoints",
                },
            }],
        }})
    };
    let (status, headers, v) = sim
        .get("/v4/users/me/dataTypes/steps/dataPoints", None, &[])
        .await;
    assert_eq!(status, 401);
    assert_eq!(v, expect("CREDENTIALS_MISSING", MSG_MISSING_CREDENTIALS));
    assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    let (status, v) = sim.list("ya29.unknown", "steps", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(
        v,
        expect("ACCESS_TOKEN_TYPE_UNSUPPORTED", MSG_INVALID_CREDENTIALS)
    );
    // Valid, then revoked by the control API.
    let (status, _) = sim.list(&token, "steps", &[]).await;
    assert_eq!(status, 200);
    let v = sim
        .control(
            reqwest::Method::DELETE,
            &format!("/_sim/users/{UID}/tokens"),
            json!({}),
        )
        .await;
    assert_eq!(v["revoked"], 1);
    let (status, v) = sim.list(&token, "steps", &[]).await;
    assert_eq!((status, reason(&v)), (401, "ACCESS_TOKEN_TYPE_UNSUPPORTED"));
    // Expired via the control API.
    let token = sim.user(UID, None).await;
    sim.sim(&format!("/_sim/users/{UID}/expire-access"), json!({}))
        .await;
    let (status, v) = sim.list(&token, "steps", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(v, expect("ACCESS_TOKEN_EXPIRED", MSG_INVALID_CREDENTIALS));
    assert_eq!(sim.stats().await["unauthorized"], 4);
}

#[tokio::test]
async fn per_user_rate_limit_answers_429() {
    let sim = start(SimConfig {
        rate_limit_per_user: 3,
        ..SimConfig::default()
    })
    .await;
    let a = sim.user(UID, None).await;
    let b = sim.user("other", None).await;
    for _ in 0..3 {
        assert_eq!(sim.list(&a, "steps", &[]).await.0, 200);
    }
    let (status, headers, v) = sim
        .get("/v4/users/me/dataTypes/steps/dataPoints", Some(&a), &[])
        .await;
    assert_eq!(status, 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(v["error"]["code"], 429);
    assert_eq!(reason(&v), "RATE_LIMIT_EXCEEDED");
    let retry: i64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Per user: the other user is not limited.
    assert_eq!(sim.list(&b, "steps", &[]).await.0, 200);
    // Without Retry-After when switched off.
    sim.sim("/_sim/config", json!({ "retry_after": false }))
        .await;
    let (status, headers, _) = sim.get("/v4/users/me/identity", Some(&a), &[]).await;
    assert_eq!(status, 429);
    assert!(!headers.contains_key(header::RETRY_AFTER));
    // The window slides with the simulated clock.
    sim.sim("/_sim/clock/advance", json!({ "seconds": 61 }))
        .await;
    assert_eq!(sim.list(&a, "steps", &[]).await.0, 200);
    let stats = sim.stats().await;
    assert_eq!(stats["users"][UID]["rate_limited"], 2);
    assert_eq!(stats["users"][UID]["requests"], 6);
    assert_eq!(stats["users"][UID]["by_data_type"]["steps"], 4);
}
