//! Records the tests put on the topics themselves, built as the stages would.

use ohx_common::records::{
    AGGREGATION_HOURLY, Component, Context, Device, Measurement, series_key,
};

/// One intraday heart-rate sample of a Withings watch at `ts` (epoch ms), as the fetcher emits
/// it for the hourly aggregator; `fetched_through` is the fetch progress it carries.
pub fn heart_rate_sample(
    context: Context,
    userid: i64,
    patient_id: &str,
    ts: i64,
    bpm: f64,
    fetched_through: Option<i64>,
) -> Measurement {
    Measurement {
        context,
        measurement_id: format!("withings:{userid}:hr:{}:watch-{userid}", ts / 1000),
        series_key: series_key(patient_id, "withings", "heart_rate"),
        data_type: "heart_rate".into(),
        aggregation: AGGREGATION_HOURLY.into(),
        effective_start: ts,
        effective_end: None,
        utc_offset_seconds: Some(3600),
        components: vec![Component {
            code: "value".into(),
            value: bpm,
            unit: "/min".into(),
            decimals: None,
        }],
        device: Some(Device {
            device_id: format!("watch-{userid}"),
            model: Some("ScanWatch".into()),
            model_id: Some("93".into()),
            manufacturer: Some("Withings".into()),
        }),
        entry_method: Some("device".into()),
        provider_group_id: None,
        provider_modified_at: None,
        fetched_through,
        status: None,
        waveform: None,
    }
}
