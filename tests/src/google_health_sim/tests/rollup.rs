//! `dailyRollUp`: value rendering, sums per civil day, range caps, scopes and errors.

use super::*;

/// `POST …/{data_type}/dataPoints:dailyRollUp` with `body`; the status and the raw body.
async fn roll_up_raw(sim: &Sim, token: Option<&str>, path: &str, body: &str) -> (u16, String) {
    let mut req = sim
        .http
        .post(format!("{}{path}", sim.base))
        .header(header::CONTENT_TYPE, "application/json")
        .query(&[("prettyPrint", "false")])
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn roll_up(sim: &Sim, token: &str, data_type: &str, body: Value) -> (u16, Value) {
    let path = format!("/v4/users/me/dataTypes/{data_type}/dataPoints:dailyRollUp");
    let (status, text) = roll_up_raw(sim, Some(token), &path, &body.to_string()).await;
    (status, serde_json::from_str(&text).unwrap())
}

/// A `DailyRollUpDataPointsRequest` of `[from, to)` (`YYYY-MM-DD`).
fn roll_up_body(from: &str, to: &str, window: Option<i64>) -> Value {
    let date = |s: &str| {
        let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        json!({ "date": date_json(d) })
    };
    let mut body = json!({ "range": { "start": date(from), "end": date(to) } });
    if let Some(w) = window {
        body["windowSizeDays"] = json!(w);
    }
    body
}

/// Civil-day row bounds as Google writes them.
fn day_bounds(from: (i32, u32, u32), to: (i32, u32, u32)) -> (Value, Value) {
    let civil = |(y, m, d): (i32, u32, u32)| json!({ "date": { "year": y, "month": m, "day": d }, "time": {} });
    (civil(from), civil(to))
}

fn steps_at(start: &str, offset: &str, count: &str) -> Value {
    let end = (parse_instant(start).unwrap() + TimeDelta::minutes(1))
        .to_rfc3339_opts(SecondsFormat::Secs, true);
    let mut p = steps(start, &end, count);
    p["steps"]["interval"]["startUtcOffset"] = json!(offset);
    p["steps"]["interval"]["endUtcOffset"] = json!(offset);
    p
}

#[test]
fn roll_up_values_render_like_google() {
    assert_eq!(double_json(69.0), json!(69));
    assert_eq!(double_json(62.5), json!(62.5));
    assert_eq!(duration_json(TimeDelta::seconds(3600)), "3600s");
    assert_eq!(duration_json(TimeDelta::milliseconds(1500)), "1.500s");
    assert_eq!(
        duration_json(TimeDelta::nanoseconds(1_000_001)),
        "0.001000001s"
    );
    assert_eq!(snake_case("windowSizeDays"), "window_size_days");
    let steps_t = DataType::by_id("steps").unwrap();
    let hr = DataType::by_id("heart-rate").unwrap();
    assert_eq!((rollup_cap_days(steps_t), rollup_cap_days(hr)), (90, 14));
    // Every type the simulator rolls up supports dailyRollUp and has a row key of its own.
    for t in DATA_TYPES {
        if rollup_kind(t).is_some() {
            assert!(t.supports(OP_DAILY_ROLLUP), "{}", t.id);
        }
    }
    assert_eq!(
        rollup_kind(DataType::by_id("total-calories").unwrap()),
        None
    );
}

#[tokio::test]
async fn daily_roll_up_sums_steps_per_civil_day() {
    let sim = start(SimConfig::default()).await;
    let token = sim.user(UID, None).await;
    let est = "-18000s";
    // An explicit civil start wins over instant + offset (02:00Z at +00:00 would be the 26th).
    let mut civil = steps_at("2026-07-26T02:00:00Z", "0s", "9");
    civil["steps"]["interval"]["civilStartTime"] =
        json!({ "date": { "year": 2026, "month": 7, "day": 25 }, "time": { "hours": 21 } });
    let mut phone = steps_at("2026-07-23T14:00:00Z", est, "5");
    phone["dataSource"] =
        json!({ "platform": "HEALTH_CONNECT", "device": { "formFactor": "PHONE" } });
    sim.seed(
        UID,
        "steps",
        json!([
            // Civil 2026-07-21 19:00: before the range.
            steps_at("2026-07-22T00:00:00Z", est, "100000"),
            // Civil 2026-07-22 18:30 and 22:00 (the second after UTC midnight).
            steps_at("2026-07-22T23:30:00Z", est, "100"),
            steps_at("2026-07-23T03:00:00Z", est, "50"),
            // Civil 2026-07-23 00:30 and 11:00.
            steps_at("2026-07-23T05:30:00Z", est, "7"),
            steps_at("2026-07-23T16:00:00Z", est, "1000"),
            phone,
            // Nothing on the 24th. Civil 2026-07-25 07:00.
            steps_at("2026-07-25T12:00:00Z", est, "42"),
            civil,
            // Civil 2026-07-26 23:00, the last day of the range.
            steps_at("2026-07-27T04:00:00Z", est, "3"),
            // Civil 2026-07-27 01:00: the range end is exclusive.
            steps_at("2026-07-27T06:00:00Z", est, "100000"),
        ]),
    )
    .await;

    let row = |from, to, count: &str| {
        let (s, e) = day_bounds(from, to);
        json!({ "civilStartTime": s, "civilEndTime": e, "steps": { "countSum": count } })
    };
    let daily = json!({ "rollupDataPoints": [
        row((2026, 7, 22), (2026, 7, 23), "150"),
        row((2026, 7, 23), (2026, 7, 24), "1012"),
        row((2026, 7, 25), (2026, 7, 26), "51"),
        row((2026, 7, 26), (2026, 7, 27), "3"),
    ]});
    let (status, v) = roll_up(
        &sim,
        &token,
        "steps",
        roll_up_body("2026-07-22", "2026-07-27", Some(1)),
    )
    .await;
    assert_eq!((status, &v), (200, &daily));
    // windowSizeDays defaults to 1; snake_case names are accepted; no page token, ever.
    let (status, v) = roll_up(
        &sim,
        &token,
        "steps",
        roll_up_body("2026-07-22", "2026-07-27", None),
    )
    .await;
    assert_eq!((status, &v), (200, &daily));
    let mut snake = roll_up_body("2026-07-22", "2026-07-27", None);
    snake["window_size_days"] = json!("1");
    snake["page_size"] = json!(5);
    let (status, v) = roll_up(&sim, &token, "steps", snake).await;
    assert_eq!((status, &v), (200, &daily));
    sim.sim("/_sim/config", json!({ "empty_next_page_token": true }))
        .await;
    let path = "/v4/users/me/dataTypes/steps/dataPoints:dailyRollUp";
    let body = roll_up_body("2026-07-22", "2026-07-27", Some(1)).to_string();
    let (status, text) = roll_up_raw(&sim, Some(&token), path, &body).await;
    assert_eq!(status, 200);
    assert!(!text.contains("nextPageToken"), "{text}");
    // No data in the range: exactly {}.
    let body = roll_up_body("2026-08-01", "2026-08-03", Some(1)).to_string();
    assert_eq!(
        roll_up_raw(&sim, Some(&token), path, &body).await,
        (200, "{}".to_owned())
    );

    // Windows of 2 days from the range start; the last one is cut at the range end.
    let (_, v) = roll_up(
        &sim,
        &token,
        "steps",
        roll_up_body("2026-07-22", "2026-07-27", Some(2)),
    )
    .await;
    assert_eq!(
        v,
        json!({ "rollupDataPoints": [
            row((2026, 7, 22), (2026, 7, 24), "1162"),
            row((2026, 7, 24), (2026, 7, 26), "51"),
            row((2026, 7, 26), (2026, 7, 27), "3"),
        ]})
    );

    // Source families.
    let mut wear = roll_up_body("2026-07-23", "2026-07-24", None);
    wear["dataSourceFamily"] = json!("users/me/dataSourceFamilies/google-wearables");
    let (_, v) = roll_up(&sim, &token, "steps", wear).await;
    assert_eq!(
        v,
        json!({ "rollupDataPoints": [row((2026, 7, 23), (2026, 7, 24), "1007")] })
    );

    // Averages and extremes of samples (+05:30: 20:00Z is the next civil day).
    sim.seed(
        UID,
        "heart-rate",
        json!([
            heart_rate("2026-08-29T05:29:57Z", "61"),
            heart_rate("2026-08-29T05:30:57Z", "64"),
            heart_rate("2026-08-29T20:00:00Z", "70"),
        ]),
    )
    .await;
    let (status, v) = roll_up(
        &sim,
        &token,
        "heart-rate",
        roll_up_body("2026-08-29", "2026-09-12", None),
    )
    .await;
    let (s29, e29) = day_bounds((2026, 8, 29), (2026, 8, 30));
    let (s30, e30) = day_bounds((2026, 8, 30), (2026, 8, 31));
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({ "rollupDataPoints": [
            { "civilStartTime": s29, "civilEndTime": e29, "heartRate":
                { "beatsPerMinuteAvg": 62.5, "beatsPerMinuteMin": 61, "beatsPerMinuteMax": 64 } },
            { "civilStartTime": s30, "civilEndTime": e30, "heartRate":
                { "beatsPerMinuteAvg": 70, "beatsPerMinuteMin": 70, "beatsPerMinuteMax": 70 } },
        ]})
    );

    // Grouped values: active minutes by level, time in zone as summed interval lengths.
    let interval = |start: &str, end: &str| json!({ "startTime": start, "endTime": end, "startUtcOffset": "0s", "endUtcOffset": "0s" });
    sim.seed(
        UID,
        "active-minutes",
        json!([
            { "activeMinutes": { "interval": interval("2026-08-01T10:00:00Z", "2026-08-01T11:00:00Z"),
              "activeMinutesByActivityLevel": [
                  { "activityLevel": "VIGOROUS", "activeMinutes": "5" },
                  { "activityLevel": "LIGHT", "activeMinutes": "20" } ] } },
            { "activeMinutes": { "interval": interval("2026-08-01T12:00:00Z", "2026-08-01T13:00:00Z"),
              "activeMinutesByActivityLevel": [
                  { "activityLevel": "LIGHT", "activeMinutes": "10" } ] } },
        ]),
    )
    .await;
    sim.seed(
        UID,
        "time-in-heart-rate-zone",
        json!([
            { "timeInHeartRateZone": { "interval": interval("2026-08-01T10:00:00Z", "2026-08-01T10:30:00Z"),
              "heartRateZoneType": "PEAK" } },
            { "timeInHeartRateZone": { "interval": interval("2026-08-01T11:00:00Z", "2026-08-01T11:00:01.5Z"),
              "heartRateZoneType": "PEAK" } },
            { "timeInHeartRateZone": { "interval": interval("2026-08-01T12:00:00Z", "2026-08-01T12:01:00Z"),
              "heartRateZoneType": "LIGHT" } },
        ]),
    )
    .await;
    let (_, v) = roll_up(
        &sim,
        &token,
        "active-minutes",
        roll_up_body("2026-08-01", "2026-08-02", None),
    )
    .await;
    assert_eq!(
        v["rollupDataPoints"][0]["activeMinutes"],
        json!({ "activeMinutesRollupByActivityLevel": [
            { "activityLevel": "LIGHT", "activeMinutesSum": "30" },
            { "activityLevel": "VIGOROUS", "activeMinutesSum": "5" },
        ]})
    );
    let (_, v) = roll_up(
        &sim,
        &token,
        "time-in-heart-rate-zone",
        roll_up_body("2026-08-01", "2026-08-02", None),
    )
    .await;
    assert_eq!(
        v["rollupDataPoints"][0]["timeInHeartRateZone"],
        json!({ "timeInHeartRateZones": [
            { "heartRateZone": "LIGHT", "duration": "60s" },
            { "heartRateZone": "PEAK", "duration": "1801.500s" },
        ]})
    );
    let stats = sim.stats().await;
    assert_eq!(stats["users"][UID]["by_data_type"]["steps"], 7);
}

#[tokio::test]
async fn daily_roll_up_caps_scopes_and_errors() {
    let sim = start(SimConfig::default()).await;
    let token = sim.user(UID, None).await;
    let call = |t: &'static str, body: Value| {
        let (sim, token) = (&sim, token.clone());
        async move { roll_up(sim, &token, t, body).await }
    };

    // Range caps: 90 days (steps), 14 days (heart-rate), counted in whole windows.
    let (status, v) = call("steps", roll_up_body("2026-01-01", "2026-04-01", None)).await;
    assert_eq!((status, v), (200, json!({})), "90 days");
    let (status, err) = call("steps", roll_up_body("2026-01-01", "2026-04-02", None)).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "INVALID_ROLLUP_QUERY_DURATION")
    );
    assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(
        err["error"]["details"][0]["domain"],
        "health.googleapis.com"
    );
    let (status, _) = call("heart-rate", roll_up_body("2026-01-01", "2026-01-15", None)).await;
    assert_eq!(status, 200, "14 days");
    let (status, err) = call("heart-rate", roll_up_body("2026-01-01", "2026-01-16", None)).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "INVALID_ROLLUP_QUERY_DURATION")
    );
    // Weekly windows: ⌊90/7⌋ = 12 windows; 84 days fit, 85 need a 13th.
    let (status, _) = call("steps", roll_up_body("2026-01-01", "2026-03-26", Some(7))).await;
    assert_eq!(status, 200);
    let (status, err) = call("steps", roll_up_body("2026-01-01", "2026-03-27", Some(7))).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "INVALID_ROLLUP_QUERY_DURATION")
    );
    // pageSize bounds the query: above the ceiling, or below the windows of the range.
    let with_page = |from, to, window, size: i64| {
        let mut b = roll_up_body(from, to, Some(window));
        b["pageSize"] = json!(size);
        b
    };
    let (status, err) = call("steps", with_page("2026-01-01", "2026-01-02", 7, 13)).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "INVALID_ROLLUP_QUERY_DURATION")
    );
    let (status, err) = call("steps", with_page("2026-01-01", "2026-01-21", 7, 2)).await;
    assert_eq!((status, reason(&err)), (400, "INVALID_DATA_POINT_NAME"));
    let (status, _) = call("steps", with_page("2026-01-01", "2026-01-21", 7, 3)).await;
    assert_eq!(status, 200);
    let (status, err) = call("steps", with_page("2026-01-01", "2026-01-02", 1, -1)).await;
    assert_eq!((status, reason(&err)), (400, "INVALID_PAGE_SIZE"));

    // The body.
    let day = roll_up_body("2026-01-01", "2026-01-02", None);
    let mut cases: Vec<(Value, &str)> = Vec::new();
    cases.push((json!({}), "INVALID_TIME_RANGE_INTERVAL_FORMAT"));
    cases.push((
        json!({ "range": { "start": day["range"]["start"] } }),
        "INVALID_TIME_RANGE_INTERVAL_FORMAT",
    ));
    cases.push((
        roll_up_body("2026-01-02", "2026-01-02", None),
        "INVALID_TIME_RANGE",
    ));
    let mut bad_date = day.clone();
    bad_date["range"]["end"]["date"]["month"] = json!(13);
    cases.push((bad_date, "INVALID_CIVIL_DATE_TIME"));
    let mut no_date = day.clone();
    no_date["range"]["end"] = json!({ "time": {} });
    cases.push((no_date, "INVALID_CIVIL_DATE_TIME"));
    let mut misaligned = day.clone();
    misaligned["range"]["start"]["time"] = json!({ "hours": 5 });
    cases.push((misaligned, "INVALID_ROLLUP_WINDOW"));
    cases.push((
        roll_up_body("2026-01-01", "2026-01-02", Some(-1)),
        "INVALID_ROLLUP_WINDOW",
    ));
    let mut family = day.clone();
    family["dataSourceFamily"] = json!("phones");
    cases.push((family, "INVALID_DATA_POINT_DATA_SOURCE_FAMILY"));
    for (body, want) in cases {
        let (status, err) = call("steps", body.clone()).await;
        assert_eq!((status, reason(&err)), (400, want), "{body}");
    }
    // Bodies the transcoder refuses: a BadRequest detail and no ErrorInfo.
    let path = "/v4/users/me/dataTypes/steps/dataPoints:dailyRollUp";
    let mut unknown = day.clone();
    unknown["windowSize"] = json!("86400s");
    let mut wrong_type = day.clone();
    wrong_type["windowSizeDays"] = json!("one");
    for body in [
        "{\"range\":".to_owned(),
        "[]".to_owned(),
        unknown.to_string(),
        wrong_type.to_string(),
    ] {
        let (status, text) = roll_up_raw(&sim, Some(&token), path, &body).await;
        let err: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(err["error"]["status"], "INVALID_ARGUMENT");
        assert_eq!(
            err["error"]["details"][0]["@type"], "type.googleapis.com/google.rpc.BadRequest",
            "{body}"
        );
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Invalid"),
            "{err}"
        );
    }

    // Checks before the body, in the order of the other data methods.
    let (status, text) = roll_up_raw(&sim, None, path, &day.to_string()).await;
    assert_eq!(status, 401, "{text}");
    let profile_only = sim.user("u-profile", Some(vec![PROFILE])).await;
    let (status, err) = roll_up(&sim, &profile_only, "steps", day.clone()).await;
    assert_eq!(
        (status, reason(&err)),
        (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
    );
    assert_eq!(
        err["error"]["details"][0]["metadata"]["method"],
        "google.devicesandservices.health.v4.DataPointsService.DailyRollUpDataPoints"
    );
    // A write scope is not a roll-up scope.
    let write_only = sim
        .user("u-write", Some(vec!["activity_and_fitness.writeonly"]))
        .await;
    let (status, err) = roll_up(&sim, &write_only, "steps", day.clone()).await;
    assert_eq!(
        (status, reason(&err)),
        (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
    );
    let metrics_only = sim.user("u-metrics", Some(vec![METRICS])).await;
    let (status, err) = roll_up(&sim, &metrics_only, "steps", day.clone()).await;
    assert_eq!((status, reason(&err)), (403, "MISSING_OAUTH_SCOPE"));
    assert_eq!(err["error"]["details"][0]["metadata"]["dataType"], "steps");
    let (status, _) = roll_up(&sim, &metrics_only, "heart-rate", day.clone()).await;
    assert_eq!(status, 200);
    let mixed = sim
        .user(
            "u-mixed",
            Some(vec!["activity_and_fitness.readonly", "cloud-platform"]),
        )
        .await;
    let (status, err) = roll_up(&sim, &mixed, "steps", day.clone()).await;
    assert_eq!((status, reason(&err)), (403, "DISALLOWED_OAUTH_SCOPES"));
    let numeric = format!("/v4/users/{UID}/dataTypes/steps/dataPoints:dailyRollUp");
    let (status, text) = roll_up_raw(&sim, Some(&token), &numeric, &day.to_string()).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&text).unwrap()),
        (
            400,
            json!({ "error": { "code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT" } })
        )
    );
    let (status, err) = call("heartRate", day.clone()).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "INVALID_PARENT_DATA_TYPE_COLLECTION")
    );
    let (status, err) = call("activity-level", day.clone()).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "UNSUPPORTED_DATA_TYPE_ACTION")
    );
    assert_eq!(
        err["error"]["message"],
        "The data type 'activity-level' does not support the dailyRollUp action."
    );
    // A type check comes before the body: an unsupported type with a bad body is still 400
    // UNSUPPORTED_DATA_TYPE_ACTION.
    let (status, err) = call("sleep", json!({})).await;
    assert_eq!(
        (status, reason(&err)),
        (400, "UNSUPPORTED_DATA_TYPE_ACTION")
    );
    // Roll-up-only types the simulator cannot compute.
    let (status, err) = call("total-calories", day.clone()).await;
    assert_eq!(
        (status, err["error"]["status"].as_str()),
        (501, Some("UNIMPLEMENTED"))
    );
    let v = sim
        .sim(
            "/_sim/users",
            json!({ "healthUserId": "u-nolink", "linked": false,
                    "client_id": "app", "client_secret": "secret" }),
        )
        .await;
    let unlinked = v["access_token"].as_str().unwrap();
    let (status, err) = roll_up(&sim, unlinked, "steps", day.clone()).await;
    assert_eq!((status, reason(&err)), (400, "ACCOUNT_NOT_LINKED"));
    // rollUp stays unimplemented.
    let (status, _) = roll_up_raw(
        &sim,
        Some(&token),
        "/v4/users/me/dataTypes/steps/dataPoints:rollUp",
        "{}",
    )
    .await;
    assert_eq!(status, 501);
}
