//! Dead letters of every stage (`ohx.dead-letter.v1`), listed without health values and
//! re-driven to the topic they came from once what made them fail is fixed: used by `ohx dlq`
//! and the gateway's REST API.
//!
//! A dead letter's id is `<partition>:<offset>` in `ohx.dead-letter.v1`. Output never carries a
//! payload, and a reason is shown only up to its first `": "`: the stages put what failed
//! (kind, resource type and id) first and the detail after, and a detail (a schema validator's
//! message, an EHR's OperationOutcome) can quote the values it refused.

use crate::codec::Codec;
use crate::kafka::inspect::{Stored, read_topic};
use crate::kafka::{KafkaSettings, OutRecord, Producer};
use crate::records::{
    DeadLetter, FhirResource, HourlyAggregate, Measurement, PublishResult, SyncRequest, topic,
};
use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use std::time::Duration;

/// The header a re-driven record carries: the id of the dead letter it came from.
pub const REDRIVEN_FROM: &str = "ohx-redriven-from";

/// Which dead letters a command is about.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub stage: Option<String>,
    pub kind: Option<String>,
    /// Only those failed at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only these ids (`partition:offset`); all when empty.
    pub ids: Vec<(i32, i64)>,
}

impl Selection {
    pub fn selects(&self, id: (i32, i64), dl: &DeadLetter) -> bool {
        self.stage.as_ref().is_none_or(|s| *s == dl.stage)
            && self.kind.as_ref().is_none_or(|k| *k == dl.error_kind)
            && self.since_ms.is_none_or(|t| dl.failed_at >= t)
            && (self.ids.is_empty() || self.ids.contains(&id))
    }
}

/// Parses `p:o[,p:o…]`.
pub fn parse_ids(ids: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    ids.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (p, o) = s
                .split_once(':')
                .with_context(|| format!("dead letter id {s:?} is not partition:offset"))?;
            Ok((p.parse()?, o.parse()?))
        })
        .collect()
}

/// The part of a reason that names what failed, without the detail.
pub fn summary(reason: &str) -> &str {
    reason.split_once(": ").map_or(reason, |(head, _)| head)
}

/// What `list` and `show` print of a dead letter.
pub fn describe(id: (i32, i64), dl: &DeadLetter) -> Value {
    json!({
        "id": format!("{}:{}", id.0, id.1),
        "stage": dl.stage,
        "kind": dl.error_kind,
        "reason": summary(&dl.reason),
        "topic": dl.topic,
        "partition": dl.partition,
        "offset": dl.offset,
        "failed_at": chrono::DateTime::from_timestamp_millis(dl.failed_at).map(|t| t.to_rfc3339()),
        "payload_bytes": dl.payload.as_ref().map(Vec::len),
    })
}

/// The record to send again: the original key, payload and headers to the original topic,
/// marked with [`REDRIVEN_FROM`]; `None` without a payload.
pub fn redrive_record(id: (i32, i64), dl: &DeadLetter) -> Option<OutRecord> {
    let payload = dl.payload.clone()?;
    let mut headers: Vec<(String, Vec<u8>)> = dl
        .headers
        .iter()
        .filter(|h| h.key != REDRIVEN_FROM)
        .map(|h| (h.key.clone(), h.value.clone().unwrap_or_default()))
        .collect();
    headers.push((
        REDRIVEN_FROM.to_string(),
        format!("{}:{}", id.0, id.1).into_bytes(),
    ));
    Some(OutRecord {
        topic: dl.topic.clone(),
        partition: None,
        key: dl.key.clone(),
        payload,
        headers,
    })
}

/// The organization and patient of the record a dead letter holds, when its payload decodes
/// as the record of its topic (a record that never decoded belongs to nobody it can name).
pub async fn owner(codec: &Codec, dl: &DeadLetter) -> Option<(String, String)> {
    let payload = dl.payload.as_deref()?;
    let context = match dl.topic.as_str() {
        topic::SYNC_REQUESTS => codec.decode::<SyncRequest>(payload).await.ok()?.context,
        topic::MEASUREMENTS => codec.decode::<Measurement>(payload).await.ok()?.context,
        topic::HOURLY_AGGREGATES => codec.decode::<HourlyAggregate>(payload).await.ok()?.context,
        topic::FHIR_RESOURCES | topic::FHIR_OUTBOX => {
            codec.decode::<FhirResource>(payload).await.ok()?.context
        }
        topic::PUBLISH_RESULTS => {
            let r = codec.decode::<PublishResult>(payload).await.ok()?;
            return Some((r.organization_id, r.patient_id));
        }
        _ => return None,
    };
    Some((context.organization_id, context.patient_id))
}

/// Every dead letter with its id, oldest first per partition (the broker must answer within
/// `timeout`).
pub async fn read(
    kafka: &KafkaSettings,
    codec: &Codec,
    timeout: Duration,
) -> anyhow::Result<Vec<((i32, i64), DeadLetter)>> {
    let kafka = kafka.clone();
    let stored: Vec<Stored> =
        tokio::task::spawn_blocking(move || read_topic(&kafka, topic::DEAD_LETTER, timeout))
            .await??;
    let mut out = Vec::with_capacity(stored.len());
    for r in stored {
        let dl: DeadLetter = codec
            .decode(&r.payload)
            .await
            .with_context(|| format!("dead letter {}:{} does not decode", r.partition, r.offset))?;
        out.push(((r.partition, r.offset), dl));
    }
    Ok(out)
}

/// Sends the selected dead letters again; prints the outcome counts.
pub async fn redrive(
    letters: &[((i32, i64), DeadLetter)],
    selection: &Selection,
    producer: &Producer,
    dry_run: bool,
) -> anyhow::Result<Value> {
    let selected: Vec<&((i32, i64), DeadLetter)> = letters
        .iter()
        .filter(|(id, dl)| selection.selects(*id, dl))
        .collect();
    if selected.is_empty() {
        bail!("no dead letter matches");
    }
    let records: Vec<OutRecord> = selected
        .iter()
        .filter_map(|(id, dl)| redrive_record(*id, dl))
        .collect();
    let without_payload = selected.len() - records.len();
    if !dry_run && !records.is_empty() {
        producer.send_all(&records).await.context(
            "the broker did not take the re-driven records; nothing is known to be sent",
        )?;
    }
    Ok(json!({
        "selected": selected.len(),
        "redriven": if dry_run { 0 } else { records.len() },
        "would_redrive": if dry_run { records.len() } else { 0 },
        "without_payload": without_payload,
        "dry_run": dry_run,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::records::Header;

    fn dl(stage: &str, kind: &str, failed_at: i64) -> DeadLetter {
        DeadLetter {
            stage: stage.into(),
            reason: "Observation ohx-1 is not valid FHIR R5: 121.5 is not of type string".into(),
            error_kind: kind.into(),
            topic: "ohx.measurements.v1".into(),
            partition: 3,
            offset: 17,
            key: Some(b"series".to_vec()),
            payload: Some(vec![0, 0, 0, 0, 2, 9]),
            headers: vec![
                Header {
                    key: "traceparent".into(),
                    value: Some(b"00-abc".to_vec()),
                },
                Header {
                    key: REDRIVEN_FROM.into(),
                    value: Some(b"0:1".to_vec()),
                },
            ],
            failed_at,
        }
    }

    #[test]
    fn test_reasons_are_shown_without_their_detail() {
        assert_eq!(
            summary("Observation ohx-1 is not valid FHIR R5: 121.5 is not of type string"),
            "Observation ohx-1 is not valid FHIR R5"
        );
        assert_eq!(summary("no colon"), "no colon");
        let shown = describe((1, 2), &dl("fhir-mapper", "validation", 0)).to_string();
        assert!(!shown.contains("121.5"), "{shown}");
        assert!(!shown.contains("payload\":["), "no payload bytes: {shown}");
    }

    #[test]
    fn test_selection_by_stage_kind_time_and_id() {
        let d = dl("fhir-mapper", "mapping", 1_000);
        assert!(Selection::default().selects((0, 1), &d));
        let by_stage = Selection {
            stage: Some("publisher".into()),
            ..Selection::default()
        };
        assert!(!by_stage.selects((0, 1), &d));
        let by_kind_and_time = Selection {
            kind: Some("mapping".into()),
            since_ms: Some(1_000),
            ..Selection::default()
        };
        assert!(by_kind_and_time.selects((0, 1), &d));
        let later = Selection {
            since_ms: Some(1_001),
            ..Selection::default()
        };
        assert!(!later.selects((0, 1), &d));
        let by_id = Selection {
            ids: parse_ids("0:1, 2:5").unwrap(),
            ..Selection::default()
        };
        assert!(by_id.selects((2, 5), &d));
        assert!(!by_id.selects((2, 6), &d));
        assert!(parse_ids("7").is_err());
    }

    #[test]
    fn test_a_redriven_record_is_the_original_marked_with_its_dead_letter() {
        let r = redrive_record((4, 99), &dl("fhir-mapper", "mapping", 0)).unwrap();
        assert_eq!(r.topic, "ohx.measurements.v1");
        assert_eq!(r.key.as_deref(), Some(&b"series"[..]));
        assert_eq!(r.payload, vec![0, 0, 0, 0, 2, 9]);
        assert_eq!(
            r.headers,
            vec![
                ("traceparent".to_string(), b"00-abc".to_vec()),
                (REDRIVEN_FROM.to_string(), b"4:99".to_vec()),
            ]
        );
        let mut without = dl("fetcher", "decode", 0);
        without.payload = None;
        assert!(redrive_record((0, 0), &without).is_none());
    }
}
