//! Google Health notifications (`google-health.md` §4.3–4.4): the verification probe
//! `{"type": "verification"}`, and notifications `{"data": {version, healthUserId, operation,
//! dataType, intervals[]}}` as one object or a JSON array of up to 99 (live traffic batches).
//!
//! Notifications never carry measurements: each says which user's data type changed over which
//! intervals. One [`Notice`] per (user, data type, operation) of a body, over the union of its
//! physical-time intervals; an interval without both ends is left out (a notice without any is
//! fetched over the fetcher's default window). `clientProvidedSubscriptionName` is a fresh UUID
//! per notification for automatic subscriptions, so it is not part of the event: Google's
//! retries and duplicates of a notification are then the same sync request.

use crate::{BadNotice, Notice, NoticeKind};
use serde_json::Value;
use std::collections::BTreeMap;

/// Parses an RFC 3339 instant (any number of fractional digits) into epoch ms.
fn instant_ms(text: &str) -> Option<i64> {
    text.trim()
        .parse::<jiff::Timestamp>()
        .ok()
        .map(jiff::Timestamp::as_millisecond)
}

/// The physical-time window of an interval (epoch ms, end exclusive), when it has both ends.
fn interval(v: &Value) -> Option<(i64, i64)> {
    let p = v.get("physicalTimeInterval")?;
    let start = instant_ms(p.get("startTime")?.as_str()?)?;
    let end = instant_ms(p.get("endTime")?.as_str()?)?;
    // An instant interval (start = end) still names the millisecond that changed.
    (start <= end).then_some((start, end.max(start + 1)))
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, BadNotice> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| BadNotice(format!("data.{key} is missing")))
}

/// Parses a notification body: a verification probe, or notifications.
///
/// # Errors
/// A text naming what is malformed (the body is refused whole).
pub fn parse(body: &[u8]) -> Result<Vec<Notice>, BadNotice> {
    let json: Value = serde_json::from_slice(body)
        .map_err(|_| BadNotice("not a Google Health notification: JSON expected".into()))?;
    if json.get("type").and_then(Value::as_str) == Some("verification") {
        return Ok(vec![Notice {
            provider_user_id: String::new(),
            event: "verification".into(),
            kind: NoticeKind::Verification,
            categories: Vec::new(),
            window: None,
        }]);
    }
    let items = match json {
        Value::Array(items) => items,
        object @ Value::Object(_) => vec![object],
        _ => {
            return Err(BadNotice(
                "a notification or an array of them expected".into(),
            ));
        }
    };
    if items.len() > 1000 {
        return Err(BadNotice("more than 1000 notifications in one body".into()));
    }
    // (user, data type, operation) → union of windows (None: no usable interval)
    let mut merged: BTreeMap<(String, String, String), Option<(i64, i64)>> = BTreeMap::new();
    for item in &items {
        let data = item
            .get("data")
            .ok_or_else(|| BadNotice("a notification without data".into()))?;
        let user = text(data, "healthUserId")?;
        let data_type = text(data, "dataType")?;
        let operation = text(data, "operation")?;
        let ok = |s: &str, max: usize| {
            s.len() <= max
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !ok(user, 128) || !ok(data_type, 64) || !ok(operation, 32) {
            return Err(BadNotice(
                "healthUserId, dataType or operation is malformed".into(),
            ));
        }
        let window = data
            .get("intervals")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(interval)
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)));
        let key = (user.to_owned(), data_type.to_owned(), operation.to_owned());
        let entry = merged.entry(key).or_insert(window);
        *entry = match (*entry, window) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            (a, b) => a.or(b),
        };
    }
    Ok(merged
        .into_iter()
        .map(|((user, data_type, operation), window)| Notice {
            provider_user_id: user,
            event: format!("{operation}:{data_type}"),
            kind: NoticeKind::Data,
            categories: vec![data_type],
            window,
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The documented example (§4.4), with its typo'd start time, and a live-shaped one.
    const DOC: &str = r#"{
      "data": {
        "version": "1",
        "clientProvidedSubscriptionName": "subscription-name",
        "healthUserId": "health-user-id",
        "operation": "UPSERT",
        "dataType": "steps",
        "intervals": [
          {
            "physicalTimeInterval": {"startTime": "2026-03-0B01:29:00Z", "endTime": "2026-03-08T01:34:00Z"},
            "civilDateTimeInterval": {
              "startDateTime": {"date": {"year": 2026, "month": 3, "day": 7}, "time": {"hours": 17, "minutes": 29}},
              "endDateTime":   {"date": {"year": 2026, "month": 3, "day": 7}, "time": {"hours": 17, "minutes": 34}}
            },
            "civilIso8601TimeInterval": {"startTime": "2026-03-07T17:29:00", "endTime": "2026-03-07T17:34:00"}
          }
        ]
      }
    }"#;

    fn ms(t: &str) -> i64 {
        instant_ms(t).unwrap()
    }

    #[test]
    fn test_verification_probe_is_its_own_kind() {
        let n = parse(br#"{"type":"verification"}"#).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].kind, NoticeKind::Verification);
    }

    #[test]
    fn test_documented_object_with_an_unreadable_interval_has_no_window() {
        let n = parse(DOC.as_bytes()).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].provider_user_id, "health-user-id");
        assert_eq!(n[0].categories, ["steps"]);
        assert_eq!(n[0].event, "UPSERT:steps");
        assert_eq!(n[0].kind, NoticeKind::Data);
        assert_eq!(n[0].window, None, "the doc's own start time is malformed");
    }

    #[test]
    fn test_live_batches_merge_per_user_type_and_operation() {
        let body = r#"[
          {"data": {"version": "1", "clientProvidedSubscriptionName": "a", "healthUserId": "u1", "operation": "UPSERT",
                    "dataType": "steps", "intervals": [{"physicalTimeInterval": {"startTime": "2026-09-16T07:51:49.386781Z", "endTime": "2026-09-16T08:00:00Z"}}]}},
          {"data": {"version": "1", "clientProvidedSubscriptionName": "b", "healthUserId": "u1", "operation": "UPSERT",
                    "dataType": "steps", "intervals": [{"physicalTimeInterval": {"startTime": "2026-09-16T06:00:00Z", "endTime": "2026-09-16T06:30:00Z"}},
                                                       {"physicalTimeInterval": {"startTime": "2026-09-16T09:00:00Z"}}]}},
          {"data": {"version": "1", "clientProvidedSubscriptionName": "c", "healthUserId": "u2", "operation": "DELETE",
                    "dataType": "weight", "intervals": [{"physicalTimeInterval": {"startTime": "2026-09-15T07:00:00Z", "endTime": "2026-09-15T07:00:00Z"}}]}}
        ]"#;
        let n = parse(body.as_bytes()).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].provider_user_id, "u1");
        assert_eq!(
            n[0].window,
            Some((ms("2026-09-16T06:00:00Z"), ms("2026-09-16T08:00:00Z"))),
            "the union of the usable intervals; the one without an end is left out"
        );
        assert_eq!(n[1].event, "DELETE:weight");
        let at = ms("2026-09-15T07:00:00Z");
        assert_eq!(n[1].window, Some((at, at + 1)));
    }

    #[test]
    fn test_duplicates_with_new_subscription_names_are_one_notice() {
        let one = |name: &str| {
            format!(
                r#"{{"data": {{"version": "1", "clientProvidedSubscriptionName": "{name}", "healthUserId": "u1",
                   "operation": "UPSERT", "dataType": "heart-rate", "intervals": [{{"physicalTimeInterval":
                   {{"startTime": "2026-09-16T07:00:00Z", "endTime": "2026-09-16T07:05:00Z"}}}}]}}}}"#
            )
        };
        let a = parse(one("x").as_bytes()).unwrap();
        let b = parse(format!("[{}]", one("y")).as_bytes()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn test_malformed_bodies_are_refused() {
        for body in [
            &b"steps"[..],
            b"42",
            br#"[{"nodata": 1}]"#,
            br#"{"data": {"healthUserId": "u", "operation": "UPSERT"}}"#,
            br#"{"data": {"healthUserId": "u 1", "operation": "UPSERT", "dataType": "steps"}}"#,
        ] {
            assert!(parse(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
