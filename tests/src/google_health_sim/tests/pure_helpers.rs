//! Pure helpers: SHA-256 and PKCE, filter compilation, civil-time rendering.

use super::*;

#[test]
fn sha256_and_pkce_vectors() {
    let hex = |b: [u8; 32]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(
        hex(sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        hex(sha256(
            b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
        )),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    assert_eq!(
        hex(sha256(b"")),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        URL_SAFE_NO_PAD.encode(sha256(VERIFIER.as_bytes())),
        CHALLENGE
    );
}

#[test]
fn filters_compile_per_time_shape() {
    let reason_of = |t: &str, f: &str| {
        let t = DataType::by_id(t).unwrap();
        match parse_filter(f) {
            Err(e) => e.reason,
            Ok(None) => "EMPTY",
            Ok(Some(e)) => match compile_filter(t, &e) {
                Ok(_) => "OK",
                Err(e) => e.reason,
            },
        }
    };
    assert_eq!(
        reason_of(
            "steps",
            r#"steps.interval.start_time >= "2023-11-24T00:00:00Z" AND steps.interval.start_time < "2023-11-25T00:00:00Z""#
        ),
        "OK"
    );
    assert_eq!(
        reason_of(
            "weight",
            r#"weight.sample_time.civil_time >= "2024-08-14T12:34:56""#
        ),
        "OK"
    );
    assert_eq!(
        reason_of(
            "daily-heart-rate-variability",
            r#"daily_heart_rate_variability.date < "2024-08-15""#
        ),
        "OK"
    );
    assert_eq!(
        reason_of(
            "sleep",
            r#"(sleep.interval.end_time >= "2023-11-24T00:00:00Z" AND sleep.interval.end_time < "2023-11-25T00:00:00Z") OR sleep.interval.end_time >= "2024-01-01T00:00:00Z""#
        ),
        "OK"
    );
    assert_eq!(reason_of("steps", "   "), "EMPTY");
    // Sleep filters on the end time only; exercise on the civil start only.
    assert_eq!(
        reason_of(
            "sleep",
            r#"sleep.interval.start_time >= "2023-11-24T00:00:00Z""#
        ),
        "INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER"
    );
    assert_eq!(
        reason_of(
            "exercise",
            r#"exercise.interval.start_time >= "2023-11-24T00:00:00Z""#
        ),
        "INVALID_DATA_POINT_FILTER_DATA_TYPE_MEMBER"
    );
    assert_eq!(
        reason_of(
            "electrocardiogram",
            r#"electrocardiogram.interval.start_time < "2024-08-14T12:34:56Z""#
        ),
        "INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR"
    );
    assert_eq!(
        reason_of(
            "steps",
            r#"steps.interval.start_time > "2023-11-24T00:00:00Z""#
        ),
        "INVALID_DATA_POINT_FILTER_RESTRICTION_COMPARATOR"
    );
    assert_eq!(
        reason_of(
            "steps",
            r#"steps.interval.start_time >= "2023-11-24T00:00:00Z" OR steps.interval.start_time < "2023-11-25T00:00:00Z""#
        ),
        "INVALID_DATA_POINT_FILTER_EXPRESSION_STRUCTURE"
    );
    assert_eq!(
        reason_of(
            "steps",
            r#"heart_rate.sample_time.physical_time >= "2023-11-24T00:00:00Z""#
        ),
        "INVALID_DATA_POINT_FILTER_COLLECTION_MISMATCH"
    );
    assert_eq!(
        reason_of(
            "heart-rate",
            r#"heartRate.sample_time.physical_time >= "2023-11-24T00:00:00Z""#
        ),
        "INVALID_DATA_POINT_FILTER_DATA_TYPE_RESTRICTION"
    );
    assert_eq!(
        reason_of("steps", r#"steps.interval.start_time >= "2023-11-24""#),
        "INVALID_DATA_POINT_FILTER_TIMESTAMP_FORMAT"
    );
    assert_eq!(
        reason_of(
            "steps",
            r#"steps.interval.civil_start_time >= "2023/11/24""#
        ),
        "INVALID_DATA_POINT_FILTER_CIVIL_DATE_TIME_FORMAT"
    );
    assert_eq!(
        reason_of(
            "steps",
            r#"steps.interval.civil_start_time >= "2023-02-30""#
        ),
        "INVALID_CIVIL_DATE_TIME"
    );
    assert_eq!(
        reason_of(
            "steps",
            r#"steps.interval.civil_start_time >= "2023-11-24" AND steps.interval.start_time < "2023-11-25T00:00:00Z""#
        ),
        "INVALID_DATA_POINT_FILTER_MIXED_TIME_RESTRICTIONS"
    );
    assert_eq!(
        reason_of(
            "steps",
            r#"steps.interval.start_time >= 2023-11-24T00:00:00Z"#
        ),
        "INVALID_DATA_POINT_FILTER_RESTRICTION_ARGUMENT"
    );
    assert_eq!(
        reason_of(
            "steps",
            r#"steps.interval.start_time >= "2023-11-24T00:00:00Z" AND"#
        ),
        "INVALID_DATA_POINT_FILTER_UNEXPECTED_END_OF_INPUT"
    );
    assert_eq!(
        reason_of("steps", r#"steps.interval.start_time >= "2023"#),
        "INVALID_DATA_POINT_FILTER_SYNTAX"
    );
}

#[test]
fn civil_times_and_intervals_render_like_google() {
    let at = parse_instant("2026-09-09T01:24:33.390135Z").unwrap();
    assert_eq!(rfc3339(at), "2026-09-09T01:24:33.390135Z");
    let civil = local(at, -18000);
    assert_eq!(
        civil_json(civil),
        json!({"date":{"year":2026,"month":9,"day":8},
               "time":{"hours":20,"minutes":24,"seconds":33,"nanos":390135000}})
    );
    let midnight = NaiveDate::from_ymd_opt(2026, 8, 13)
        .unwrap()
        .and_time(NaiveTime::MIN);
    assert_eq!(
        civil_json(midnight),
        json!({"date":{"year":2026,"month":8,"day":13},"time":{}})
    );
    let start = parse_instant("2026-03-08T01:29:00Z").unwrap();
    let end = parse_instant("2026-03-08T01:34:00Z").unwrap();
    let iv = interval_json(start, end, local(start, -28800), local(end, -28800));
    assert_eq!(
        iv,
        json!({
            "physicalTimeInterval": {"startTime":"2026-03-08T01:29:00Z","endTime":"2026-03-08T01:34:00Z"},
            "civilDateTimeInterval": {
                "startDateTime": {"date":{"year":2026,"month":3,"day":7},"time":{"hours":17,"minutes":29}},
                "endDateTime": {"date":{"year":2026,"month":3,"day":7},"time":{"hours":17,"minutes":34}},
            },
            "civilIso8601TimeInterval": {"startTime":"2026-03-07T17:29:00","endTime":"2026-03-07T17:34:00"},
        })
    );
}
