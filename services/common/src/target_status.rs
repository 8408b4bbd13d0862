//! Each EHR target's delivery as the publisher replicas recorded it (`ehr_target_status`):
//! breaker state, fault flag, failures and held records, summarized over the replicas. Read by
//! `ohx targets` and the gateway's REST API; nothing here decides delivery.

use serde_json::{Value, json};

/// One replica's row for a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub instance: String,
    /// `closed` or `open`.
    pub breaker: String,
    pub fault: Option<String>,
    pub failures: i32,
    pub held: i32,
    pub not_before_ms: Option<i64>,
    pub updated_at_ms: i64,
}

/// A breaker's state at `now_ms`: an open breaker past its cool-down lets one probe through.
pub fn state(breaker: &str, not_before_ms: Option<i64>, now_ms: i64) -> &'static str {
    match (breaker, not_before_ms) {
        ("open", Some(t)) if t > now_ms => "open",
        ("open", _) => "half_open",
        _ => "closed",
    }
}

fn rank(state: &str) -> u8 {
    match state {
        "open" => 2,
        "half_open" => 1,
        _ => 0,
    }
}

/// A target's summary over its replicas' rows: the worst state, the faults flagged, the held
/// records added up; a target no replica has written about yet is `unknown`.
pub fn summarize(rows: &[Row], now_ms: i64) -> Value {
    if rows.is_empty() {
        return json!({"state": "unknown", "held": 0, "faults": [], "instances": []});
    }
    let states: Vec<&str> = rows
        .iter()
        .map(|r| state(&r.breaker, r.not_before_ms, now_ms))
        .collect();
    let worst = states
        .iter()
        .copied()
        .max_by_key(|s| rank(s))
        .unwrap_or("closed");
    let mut faults: Vec<&str> = rows.iter().filter_map(|r| r.fault.as_deref()).collect();
    faults.sort_unstable();
    faults.dedup();
    json!({
        "state": worst,
        "held": rows.iter().map(|r| i64::from(r.held)).sum::<i64>(),
        "faults": faults,
        "instances": rows.iter().zip(&states).map(|(r, s)| json!({
            "instance": r.instance,
            "state": s,
            "fault": r.fault,
            "failures": r.failures,
            "held": r.held,
            "not_before_ms": r.not_before_ms,
            "updated_at_ms": r.updated_at_ms,
        })).collect::<Vec<_>>(),
    })
}

/// The rows the replicas wrote about one target.
pub async fn rows(
    client: &impl deadpool_postgres::GenericClient,
    target: uuid::Uuid,
) -> Result<Vec<Row>, deadpool_postgres::tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT instance, breaker, fault, failures, held, \
             (extract(epoch FROM not_before) * 1000)::bigint, \
             (extract(epoch FROM updated_at) * 1000)::bigint \
             FROM ehr_target_status WHERE ehr_target_id = $1 ORDER BY instance",
            &[&target],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Row {
            instance: r.get(0),
            breaker: r.get(1),
            fault: r.get(2),
            failures: r.get(3),
            held: r.get(4),
            not_before_ms: r.get(5),
            updated_at_ms: r.get(6),
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(instance: &str, breaker: &str, fault: Option<&str>, held: i32, nb: Option<i64>) -> Row {
        Row {
            instance: instance.into(),
            breaker: breaker.into(),
            fault: fault.map(str::to_owned),
            failures: 1,
            held,
            not_before_ms: nb,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn test_state_is_half_open_once_the_cool_down_passed() {
        assert_eq!(state("open", Some(2_000), 1_000), "open");
        assert_eq!(state("open", Some(2_000), 2_000), "half_open");
        assert_eq!(state("open", None, 1_000), "half_open");
        // a closed breaker backing off is still closed
        assert_eq!(state("closed", Some(2_000), 1_000), "closed");
    }

    #[test]
    fn test_summary_takes_the_worst_replica_and_adds_held_records() {
        let s = summarize(
            &[
                row("a", "closed", None, 2, None),
                row("b", "open", Some("unauthorized"), 5, Some(9_000)),
                row("c", "open", Some("unauthorized"), 1, Some(1_000)),
            ],
            5_000,
        );
        assert_eq!(s["state"], "open");
        assert_eq!(s["held"], 8);
        assert_eq!(s["faults"], json!(["unauthorized"]));
        let states: Vec<&str> = s["instances"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["state"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(states, ["closed", "open", "half_open"]);
    }

    #[test]
    fn test_a_target_nobody_reported_on_is_unknown() {
        assert_eq!(summarize(&[], 0)["state"], "unknown");
        let s = summarize(&[row("a", "closed", None, 0, None)], 0);
        assert_eq!(
            (s["state"].as_str(), s["held"].as_i64()),
            (Some("closed"), Some(0))
        );
    }
}
