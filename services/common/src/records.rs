//! Rust forms of the Avro records in `schemas/`. Field names and order match the `.avsc` files;
//! timestamps are epoch milliseconds (Avro `timestamp-millis`).

use serde::{Deserialize, Serialize};

/// A record type with a schema in `schemas/`.
pub trait Record: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static {
    /// The schema file name in `schemas/`.
    const SCHEMA_FILE: &'static str;
}

/// Where a record comes from and where it goes; carried by every record so that the middle
/// stages need no database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    pub organization_id: String,
    pub ehr_target_id: String,
    /// The ohx patient id (uuid).
    pub patient_id: String,
    /// The patient as the EHR knows it, e.g. `Patient/123`.
    pub patient_reference: String,
    /// `withings` | `google-health` | `omron` | `beurer`.
    pub provider: String,
    pub link_id: String,
    pub provider_user_id: String,
    pub sync_request_id: String,
    /// `INITIAL` | `WEBHOOK` | `INCREMENTAL` | `NIGHTLY` | `MANUAL`.
    pub trigger: String,
    /// Receive time of the originating event, epoch ms (for end-to-end latency).
    pub received_at: i64,
    /// The FHIR version `ehr_target_id` speaks ([`FHIR_R4`] or [`FHIR_R5`]); records written
    /// before targets declared one read as R5.
    #[serde(default = "default_fhir_version")]
    pub fhir_version: String,
    /// Every EHR target of the patient, `ehr_target_id` first, set by the fetcher from the
    /// configuration when the patient has more than one; empty: `ehr_target_id` alone. The
    /// fhir-mapper maps a record once per delivery ([`Context::per_delivery`]).
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
}

/// One EHR target a patient's data goes to, with the patient as that EHR knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub ehr_target_id: String,
    /// e.g. `Patient/123`.
    pub patient_reference: String,
    /// The FHIR version this target speaks ([`FHIR_R4`] or [`FHIR_R5`]).
    #[serde(default = "default_fhir_version")]
    pub fhir_version: String,
}

/// `fhir_version` of a target that speaks FHIR R4 (4.0.1).
pub const FHIR_R4: &str = "R4";
/// `fhir_version` of a target that speaks FHIR R5 (5.0.0), the default.
pub const FHIR_R5: &str = "R5";
/// The FHIR versions a target can declare.
pub const FHIR_VERSIONS: [&str; 2] = [FHIR_R4, FHIR_R5];

fn default_fhir_version() -> String {
    FHIR_R5.to_owned()
}

impl Context {
    /// Whether the record goes to `ehr_target_id` alone, as `patient_reference`.
    pub fn single_delivery(&self) -> bool {
        match self.deliveries.as_slice() {
            [] => true,
            [d] => {
                d.ehr_target_id == self.ehr_target_id
                    && d.patient_reference == self.patient_reference
                    && d.fhir_version == self.fhir_version
            }
            _ => false,
        }
    }

    /// One context per delivery, each addressed to that delivery's target alone (its
    /// `deliveries` empty); the context itself when it has none.
    pub fn per_delivery(&self) -> Vec<Context> {
        if self.deliveries.is_empty() {
            return vec![self.clone()];
        }
        self.deliveries
            .iter()
            .map(|d| Context {
                ehr_target_id: d.ehr_target_id.clone(),
                patient_reference: d.patient_reference.clone(),
                fhir_version: d.fhir_version.clone(),
                deliveries: Vec::new(),
                ..self.clone()
            })
            .collect()
    }
}

/// Asks the fetcher to fetch a window of one provider link's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub context: Context,
    /// Data categories to fetch: `blood_pressure`, `body_weight`, `heart_rate`.
    pub categories: Vec<String>,
    /// Inclusive start, epoch ms; `None` = the strategy's default.
    pub window_start: Option<i64>,
    /// Exclusive end, epoch ms; `None` = now.
    pub window_end: Option<i64>,
    /// The provider's notification kind, e.g. `appli=4`.
    pub provider_event: Option<String>,
}

impl Record for SyncRequest {
    const SCHEMA_FILE: &'static str = "sync_request_v3.avsc";
}

/// One value of a measurement (`value` for scalars; `systolic`/`diastolic` for blood pressure).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub code: String,
    pub value: f64,
    /// UCUM unit code.
    pub unit: String,
    /// Decimal places the device reported (Withings `500000 × 10⁻⁴ kg`: 4), so that the FHIR
    /// decimal keeps its precision (`50.0000`); `None`: the value as it prints.
    #[serde(default)]
    pub decimals: Option<i32>,
}

/// The device a value was measured with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Device {
    /// The provider's device id.
    pub device_id: String,
    pub model: Option<String>,
    pub model_id: Option<String>,
    pub manufacturer: Option<String>,
}

/// `Measurement.data_type` of a device the provider lists for the user (no components): it
/// maps to the Device and its DeviceAssociation to the patient only, so a device is in the
/// chart before (or without) any measurement naming it.
pub const DATA_TYPE_DEVICE: &str = "device";

/// Aggregation policy: mapped one by one, or aggregated per UTC hour first.
pub const AGGREGATION_INDIVIDUAL: &str = "INDIVIDUAL";
/// Aggregated per UTC hour by the hourly-aggregator before mapping.
pub const AGGREGATION_HOURLY: &str = "HOURLY";

/// One normalized data point from a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub context: Context,
    /// Deterministic: provider, provider-native id, type.
    pub measurement_id: String,
    /// Patient id + provider + data type ([`series_key`]); the record key.
    pub series_key: String,
    pub data_type: String,
    /// [`AGGREGATION_INDIVIDUAL`] or [`AGGREGATION_HOURLY`].
    pub aggregation: String,
    pub effective_start: i64,
    pub effective_end: Option<i64>,
    /// The sample's local UTC offset in seconds.
    pub utc_offset_seconds: Option<i32>,
    pub components: Vec<Component>,
    pub device: Option<Device>,
    /// `device` | `device-ambiguous` | `manual`.
    pub entry_method: Option<String>,
    pub provider_group_id: Option<String>,
    pub provider_modified_at: Option<i64>,
    /// Set on the last measurement of a series in one fetch: the provider's data of the series
    /// before this time has been fetched (the series' event-time progress, epoch ms).
    #[serde(default)]
    pub fetched_through: Option<i64>,
    /// `None`: a reading. [`STATUS_ENTERED_IN_ERROR`]: the provider no longer has it (deleted
    /// at the source); its resources are retracted. Such a record has no components and no
    /// device, and its `provider_modified_at` is when the deletion was seen.
    #[serde(default)]
    pub status: Option<String>,
    /// The reading's sample series, if it is one (an ECG lead); `None` otherwise.
    #[serde(default)]
    pub waveform: Option<Waveform>,
}

/// Samples at a fixed interval (FHIR R5 SampledData): sample `i` is
/// `origin + factor × samples[i]` (in `unit`), taken at `effective_start + i × interval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Waveform {
    /// UCUM unit of `origin` and of the scaled samples, e.g. `uV`.
    pub unit: String,
    /// The zero value, in `unit`.
    pub origin: f64,
    /// Multiplier of each sample; `None`: 1.
    pub factor: Option<f64>,
    /// Time between two samples, in `interval_unit`.
    pub interval: f64,
    /// UCUM time unit of `interval`: `ms` or `s`.
    pub interval_unit: String,
    pub samples: Vec<i32>,
    /// Canonical URL of the ConceptMap that defines coded samples; `None`: quantities.
    pub code_map: Option<String>,
}

/// [`Measurement::status`] of a reading the provider deleted.
pub const STATUS_ENTERED_IN_ERROR: &str = "entered-in-error";

impl Record for Measurement {
    const SCHEMA_FILE: &'static str = "measurement_v6.avsc";
}

/// Builds the series key of a patient's data type from one provider (the key of
/// `ohx.measurements.v1`): `{patient_id}/{provider}/{data_type}`. The provider is part of it so
/// that two providers of one patient never share an hourly window or an aggregate identity.
pub fn series_key(patient_id: &str, provider: &str, data_type: &str) -> String {
    format!("{patient_id}/{provider}/{data_type}")
}

/// Statistics of one series over one UTC hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HourlyAggregate {
    pub context: Context,
    /// Deterministic: series key + hour.
    pub aggregate_id: String,
    pub series_key: String,
    pub data_type: String,
    pub unit: String,
    pub hour_start: i64,
    pub hour_end: i64,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub sum: f64,
    pub first_sample_at: i64,
    pub last_sample_at: i64,
    pub utc_offset_seconds: Option<i32>,
    pub device: Option<Device>,
    /// Source revision: the highest input offset among the hour's samples, so a later emission
    /// of the hour (more samples) has a higher one and a replay gives the same one.
    #[serde(default)]
    pub revision: i64,
    /// The hour was already emitted and this emission revises it (FHIR status `amended`).
    #[serde(default)]
    pub amends: bool,
}

impl Record for HourlyAggregate {
    const SCHEMA_FILE: &'static str = "hourly_aggregate_v3.avsc";
}

/// A FHIR R5 resource ready for an EHR target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FhirResource {
    pub context: Context,
    /// EHR target + resource type + logical id; the record key.
    pub identity: String,
    pub resource_type: String,
    pub resource_id: String,
    /// The resource as canonical JSON (object keys sorted).
    pub resource: String,
    /// Measurement or aggregate ids it was made from.
    pub source_ids: Vec<String>,
    /// Orders the contents of one identity (provider modification time, aggregate revision):
    /// content with a lower revision never replaces content with a higher one.
    #[serde(default)]
    pub source_revision: i64,
}

impl Record for FhirResource {
    const SCHEMA_FILE: &'static str = "fhir_resource_v3.avsc";
}

/// Builds the identity (record key) of a resource for an EHR target.
pub fn resource_identity(ehr_target_id: &str, resource_type: &str, resource_id: &str) -> String {
    format!("{ehr_target_id}/{resource_type}/{resource_id}")
}

/// Changelog entry of the deduplicator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupState {
    pub content_hash: String,
    /// Source revision of the last forwarded content (0: unknown or written before revisions).
    #[serde(default)]
    pub revision: i64,
}

impl Record for DedupState {
    const SCHEMA_FILE: &'static str = "dedup_state.avsc";
}

/// What the EHR said about a resource. Carries no values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishResult {
    pub identity: String,
    pub organization_id: String,
    pub ehr_target_id: String,
    pub patient_id: String,
    pub link_id: String,
    pub sync_request_id: String,
    pub resource_type: String,
    pub resource_id: String,
    /// `created` | `updated` | `unchanged` | `stale` (the server holds newer content) |
    /// `rejected`.
    pub outcome: String,
    pub http_status: i32,
    pub version_id: Option<String>,
    pub received_at: i64,
    pub confirmed_at: i64,
}

impl Record for PublishResult {
    const SCHEMA_FILE: &'static str = "publish_result.avsc";
}

/// A Kafka header kept in a dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub key: String,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub value: Option<Vec<u8>>,
}

/// A record a stage could not process, with the reason and the original bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub stage: String,
    pub reason: String,
    /// `decode` | `invalid` | `mapping` | `validation` | `rejected` | ...
    pub error_kind: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub failed_at: i64,
}

impl Record for DeadLetter {
    const SCHEMA_FILE: &'static str = "dead_letter.avsc";
}

/// Topic names of the architecture (declared as data in `topics/`).
pub mod topic {
    pub const SYNC_REQUESTS: &str = "ohx.sync-requests.v1";
    pub const MEASUREMENTS: &str = "ohx.measurements.v1";
    pub const HOURLY_AGGREGATES: &str = "ohx.hourly-aggregates.v1";
    pub const FHIR_RESOURCES: &str = "ohx.fhir-resources.v1";
    pub const DEDUP_STATE: &str = "ohx.dedup-state.v1";
    pub const FHIR_OUTBOX: &str = "ohx.fhir-outbox.v1";
    pub const PUBLISH_RESULTS: &str = "ohx.publish-results.v1";
    pub const DEAD_LETTER: &str = "ohx.dead-letter.v1";
}

/// Returns the content hash of a FHIR resource: hex SHA-256 over its canonical JSON (object
/// keys sorted) without `meta`. The deduplicator and the publisher must agree on it.
///
/// Text already canonical below its top level (what the mapper writes: no whitespace, no
/// escapes, every nested object's keys ascending) is hashed as written, its top-level members
/// sorted, without building the resource; any other text is parsed and re-serialized. Both
/// give the same hash ([`content_hash_of`]); invalid JSON is an error either way.
pub fn content_hash(resource_json: &str) -> Result<String, serde_json::Error> {
    serde_json::from_str::<serde::de::IgnoredAny>(resource_json)?;
    match canonical_members(resource_json) {
        Some(members) => Ok(hash_members(&members)),
        None => content_hash_of(&serde_json::from_str(resource_json)?),
    }
}

/// [`content_hash`] of a text the caller has checked to be JSON already: not validated again,
/// and parsed only when it is not canonical.
pub fn content_hash_checked(resource_json: &str) -> Result<String, serde_json::Error> {
    match canonical_members(resource_json) {
        Some(members) => Ok(hash_members(&members)),
        None => content_hash_of(&serde_json::from_str(resource_json)?),
    }
}

/// SHA-256 of the canonical object made of sorted top-level members, without `meta`.
fn hash_members(members: &[(&str, &str)]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"{");
    for (i, (key, value)) in members.iter().filter(|(k, _)| *k != "meta").enumerate() {
        if i > 0 {
            hasher.update(b",");
        }
        hasher.update(b"\"");
        hasher.update(key.as_bytes());
        hasher.update(b"\":");
        hasher.update(value.as_bytes());
    }
    hasher.update(b"}");
    hex::encode(hasher.finalize())
}

/// The top-level members (key, value text) of a JSON object, sorted by key, when everything
/// below the top level is already canonical (see [`content_hash`]); `None` otherwise. `text`
/// must be valid JSON.
fn canonical_members(text: &str) -> Option<Vec<(&str, &str)>> {
    let b = text.as_bytes();
    if b.first() != Some(&b'{') || b.last() != Some(&b'}') || b.contains(&b'\\') {
        return None;
    }
    let mut members = Vec::with_capacity(16);
    if b.len() == 2 {
        return Some(members);
    }
    let mut i = 1;
    loop {
        let key_end = string_end(b, i)?;
        if b.get(key_end) != Some(&b':') {
            return None;
        }
        let value_start = key_end + 1;
        let end = value_end(b, value_start)?;
        members.push((text.get(i + 1..key_end - 1)?, text.get(value_start..end)?));
        match b.get(end) {
            Some(b',') => i = end + 1,
            Some(b'}') if end + 1 == b.len() => break,
            _ => return None,
        }
    }
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    if members.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    Some(members)
}

/// The index after the string starting at `b[i]` (text without backslashes).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let close = b.get(i + 1..)?.iter().position(|c| *c == b'"')?;
    Some(i + 1 + close + 1)
}

/// The index after the value starting at `b[i]`, if it is canonical: no whitespace outside
/// strings and the keys of every object strictly ascending.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' => {
            let mut j = i + 1;
            if b.get(j) == Some(&b'}') {
                return Some(j + 1);
            }
            let mut last: Option<&[u8]> = None;
            loop {
                let key_end = string_end(b, j)?;
                let key = b.get(j + 1..key_end - 1)?;
                if last.is_some_and(|l| l >= key) {
                    return None;
                }
                last = Some(key);
                if b.get(key_end) != Some(&b':') {
                    return None;
                }
                j = value_end(b, key_end + 1)?;
                match *b.get(j)? {
                    b',' => j += 1,
                    b'}' => return Some(j + 1),
                    _ => return None,
                }
            }
        }
        b'[' => {
            let mut j = i + 1;
            if b.get(j) == Some(&b']') {
                return Some(j + 1);
            }
            loop {
                j = value_end(b, j)?;
                match *b.get(j)? {
                    b',' => j += 1,
                    b']' => return Some(j + 1),
                    _ => return None,
                }
            }
        }
        // A number, `true`, `false` or `null`: up to the next delimiter.
        _ => {
            let len = b
                .get(i..)?
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']'))?;
            let token = b.get(i..i + len)?;
            (len > 0 && !token.iter().any(u8::is_ascii_whitespace)).then_some(i + len)
        }
    }
}

/// [`content_hash`] of an already parsed resource.
pub fn content_hash_of(resource: &serde_json::Value) -> Result<String, serde_json::Error> {
    use sha2::{Digest, Sha256};
    /// Serializes an object's members except `meta`, without copying them.
    struct WithoutMeta<'a>(&'a serde_json::Map<String, serde_json::Value>);
    impl Serialize for WithoutMeta<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().filter(|(k, _)| k.as_str() != "meta"))
        }
    }
    // serde_json's map is ordered by key, so serialization is canonical.
    let canonical = match resource.as_object() {
        Some(obj) => serde_json::to_vec(&WithoutMeta(obj))?,
        None => serde_json::to_vec(resource)?,
    };
    Ok(hex::encode(Sha256::digest(&canonical)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random JSON value: objects and arrays up to `depth`, FHIR-like keys, strings with
    /// and without characters that need escapes, numbers as integers, decimals and exponents.
    fn random_value(rng: &mut impl rand::Rng, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        const KEYS: [&str; 8] = ["id", "meta", "code", "value", "a", "status", "b", "é"];
        const STRINGS: [&str; 6] = [
            "final",
            "",
            "x y",
            "quote \" inside",
            "new\nline",
            "ünï/códe",
        ];
        const NUMBERS: [&str; 6] = ["0", "-1", "121", "80.50", "1e5", "0.000001"];
        match rng.random_range(0..if depth == 0 { 4 } else { 6 }) {
            0 => Value::String(STRINGS[rng.random_range(0..STRINGS.len())].to_owned()),
            1 => serde_json::from_str(NUMBERS[rng.random_range(0..NUMBERS.len())])
                .unwrap_or_default(),
            2 => Value::Bool(rng.random()),
            3 => Value::Null,
            4 => Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| random_value(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.random_range(0..5))
                    .map(|_| {
                        let key = KEYS[rng.random_range(0..KEYS.len())].to_owned();
                        (key, random_value(rng, depth - 1))
                    })
                    .collect(),
            ),
        }
    }

    /// The hash of a resource's text is the hash of the parsed resource, whether the text is
    /// canonical (hashed as written), its top-level members shuffled, or pretty-printed
    /// (parsed again): 2,000 random resources.
    #[test]
    fn test_content_hash_of_text_is_the_hash_of_the_parsed_resource() {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut canonical_fast = 0;
        for _ in 0..2_000 {
            let serde_json::Value::Object(members) = random_value(&mut rng, 4) else {
                continue;
            };
            let value = serde_json::Value::Object(members.clone());
            let expected = content_hash_of(&value).unwrap();
            let canonical = serde_json::to_string(&value).unwrap();
            if canonical_members(&canonical).is_some() {
                canonical_fast += 1;
            }
            assert_eq!(content_hash(&canonical).unwrap(), expected, "{canonical}");
            assert_eq!(
                content_hash_checked(&canonical).unwrap(),
                expected,
                "{canonical}"
            );
            let mut shuffled: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
                .collect();
            shuffled.shuffle(&mut rng);
            let shuffled = format!("{{{}}}", shuffled.join(","));
            assert_eq!(content_hash(&shuffled).unwrap(), expected, "{shuffled}");
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            assert_eq!(content_hash(&pretty).unwrap(), expected, "{pretty}");
            assert_eq!(content_hash_checked(&pretty).unwrap(), expected, "{pretty}");
        }
        assert!(
            canonical_fast > 200,
            "{canonical_fast} texts took the fast path"
        );
    }

    #[test]
    fn test_the_fast_path_takes_only_canonical_text() {
        assert!(canonical_members(r#"{"b":1,"a":{"x":[1,"s"],"y":null}}"#).is_some());
        for text in [
            r#"{"a":{"y":1,"x":2}}"#, // nested keys not ascending
            r#"{"a":{"x":1,"x":2}}"#, // a nested key twice
            r#"{"a":1,"a":2}"#,       // a top-level key twice
            r#"{"a": 1}"#,            // whitespace
            r#"{"a":[1, 2]}"#,        // whitespace in an array
            r#"{"a":"\u00e9"}"#,      // an escape serde_json would not write
            r#"[1]"#,                 // not an object
        ] {
            assert!(canonical_members(text).is_none(), "{text}");
        }
        assert!(content_hash(r#"{"a":tru}"#).is_err());
        assert!(content_hash(r#"{"a":1} x"#).is_err());
    }

    fn ctx(deliveries: &[(&str, &str)]) -> Context {
        Context {
            organization_id: "o".into(),
            ehr_target_id: "t1".into(),
            patient_id: "p".into(),
            patient_reference: "Patient/1".into(),
            provider: "withings".into(),
            link_id: "l".into(),
            provider_user_id: "u".into(),
            sync_request_id: "s".into(),
            trigger: "WEBHOOK".into(),
            received_at: 7,
            fhir_version: FHIR_R5.into(),
            deliveries: deliveries
                .iter()
                .map(|(t, r)| Delivery {
                    ehr_target_id: (*t).into(),
                    patient_reference: (*r).into(),
                    fhir_version: FHIR_R5.into(),
                })
                .collect(),
        }
    }

    #[test]
    fn test_without_deliveries_the_record_goes_to_its_own_target() {
        let c = ctx(&[]);
        assert!(c.single_delivery());
        assert_eq!(c.per_delivery(), vec![c.clone()]);
    }

    #[test]
    fn test_a_single_delivery_is_single_only_when_it_is_the_records_own_target() {
        assert!(ctx(&[("t1", "Patient/1")]).single_delivery());
        assert!(!ctx(&[("t2", "Patient/1")]).single_delivery());
        assert!(!ctx(&[("t1", "Patient/9")]).single_delivery());
        let mut other_version = ctx(&[("t1", "Patient/1")]);
        other_version.deliveries[0].fhir_version = FHIR_R4.into();
        assert!(!other_version.single_delivery());
    }

    #[test]
    fn test_per_delivery_gives_each_target_its_own_fhir_version() {
        let mut c = ctx(&[("t1", "Patient/1"), ("t2", "Patient/abc")]);
        c.deliveries[1].fhir_version = FHIR_R4.into();
        let versions: Vec<String> = c
            .per_delivery()
            .into_iter()
            .map(|d| d.fhir_version)
            .collect();
        assert_eq!(versions, [FHIR_R5, FHIR_R4]);
    }

    #[test]
    fn test_per_delivery_addresses_each_target_alone_and_keeps_the_rest() {
        let c = ctx(&[("t1", "Patient/1"), ("t2", "Patient/abc")]);
        assert!(!c.single_delivery());
        let per = c.per_delivery();
        let addressed: Vec<(&str, &str)> = per
            .iter()
            .map(|d| (d.ehr_target_id.as_str(), d.patient_reference.as_str()))
            .collect();
        assert_eq!(addressed, vec![("t1", "Patient/1"), ("t2", "Patient/abc")]);
        for d in &per {
            assert!(d.deliveries.is_empty());
            assert!(d.single_delivery());
            assert_eq!(
                (d.patient_id.as_str(), d.link_id.as_str(), d.received_at),
                ("p", "l", 7)
            );
        }
    }
}
