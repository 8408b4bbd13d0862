//! Device and DeviceAssociation resources already acknowledged by the broker, so that a
//! measurement whose device is unchanged emits only its Observation.
//!
//! Every Withings measurement names its device; mapped naively, each one yields a Device and a
//! DeviceAssociation identical to the previous ones, which are validated, encoded and produced
//! only for the deduplicator to drop them. The mapper remembers, per identity, a hash of the
//! content it had acknowledged and skips repeats. It learns only through the processor's
//! `apply` (after the broker acknowledged the batch), so a retried batch emits them again; and
//! it starts empty after a restart or rebalance, which costs one repeat per device.
//!
//! Building the repeats only to drop them costs two thirds of mapping a measurement, so the
//! mapper also remembers what each record's device inputs built to ([`Built`]): a record whose
//! device resources would all be dropped is mapped without them.

use ohx_common::records::{Context, Device};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Most identities remembered; past it the memory starts over (a repeat is only a cost).
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Whether resources of this type repeat with every measurement of a device.
pub fn repeats_per_measurement(resource_type: &str) -> bool {
    matches!(resource_type, "Device" | "DeviceAssociation")
}

/// A hash of a JSON value's content (object keys in their map's order, which serde_json keeps
/// sorted).
pub fn content_hash(value: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    hash_json(value, &mut h);
    h.finish()
}

fn hash_json(value: &Value, h: &mut DefaultHasher) {
    match value {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => (1u8, b).hash(h),
        Value::Number(n) => (2u8, n.to_string()).hash(h),
        Value::String(s) => (3u8, s).hash(h),
        Value::Array(items) => {
            (4u8, items.len()).hash(h);
            for item in items {
                hash_json(item, h);
            }
        }
        Value::Object(map) => {
            (5u8, map.len()).hash(h);
            for (k, v) in map {
                k.hash(h);
                hash_json(v, h);
            }
        }
    }
}

/// Everything of a record its Device and DeviceAssociation are made of, besides the mapper's
/// table and settings (constant for a mapper): the target and its FHIR version, the provider,
/// the provider's user, the patient and the device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceInputs<'a>([Option<&'a str>; 9]);

impl<'a> DeviceInputs<'a> {
    /// The inputs of a record's device resources; `None` without a device.
    pub fn of(ctx: &'a Context, device: Option<&'a Device>) -> Option<Self> {
        let d = device?;
        Some(Self([
            Some(&ctx.ehr_target_id),
            Some(&ctx.fhir_version),
            Some(&ctx.provider),
            Some(&ctx.provider_user_id),
            Some(&ctx.patient_reference),
            Some(&d.device_id),
            d.model.as_deref(),
            d.model_id.as_deref(),
            d.manufacturer.as_deref(),
        ]))
    }

    fn key(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// Device resources as (identity, content hash).
type Entries = Vec<(String, u64)>;

/// The device resources (identity, content hash) that records' device inputs built to: the
/// memo of a pure function, since the table and settings are the mapper's own. Keyed by a
/// hash of the inputs, which are kept to tell a collision.
#[derive(Debug, Clone)]
pub struct Built {
    by_key: HashMap<u64, (Vec<Option<String>>, Entries)>,
    capacity: usize,
}

impl Default for Built {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Built {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            by_key: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// What these inputs built to, if remembered.
    pub fn get(&self, inputs: &DeviceInputs<'_>) -> Option<&[(String, u64)]> {
        let (stored, built) = self.by_key.get(&inputs.key())?;
        let same = stored.len() == inputs.0.len()
            && stored
                .iter()
                .zip(&inputs.0)
                .all(|(a, b)| a.as_deref() == *b);
        same.then_some(built.as_slice())
    }

    /// Remembers what the inputs built to.
    pub fn remember(&mut self, inputs: &DeviceInputs<'_>, built: Entries) {
        let key = inputs.key();
        if self.by_key.len() >= self.capacity && !self.by_key.contains_key(&key) {
            self.by_key.clear();
        }
        let stored = inputs.0.iter().map(|i| i.map(str::to_owned)).collect();
        self.by_key.insert(key, (stored, built));
    }

    /// Whether a record with these inputs can be mapped without its device resources: they are
    /// remembered and none of them would be emitted.
    pub fn all_dropped(
        &self,
        inputs: Option<&DeviceInputs<'_>>,
        known: &Devices,
        batch: &BatchDevices,
    ) -> bool {
        inputs
            .and_then(|i| self.get(i))
            .is_some_and(|built| built.iter().all(|(id, h)| !batch.wanted(known, id, *h)))
    }
}

/// Acknowledged device contents by identity.
#[derive(Debug, Clone)]
pub struct Devices {
    acknowledged: HashMap<String, u64>,
    capacity: usize,
}

impl Default for Devices {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Devices {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            acknowledged: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Whether this exact content of `identity` was acknowledged.
    pub fn is_acknowledged(&self, identity: &str, hash: u64) -> bool {
        self.acknowledged.get(identity) == Some(&hash)
    }

    /// Records contents the broker acknowledged.
    pub fn remember(&mut self, entries: &[(String, u64)]) {
        for (identity, hash) in entries {
            if self.acknowledged.len() >= self.capacity && !self.acknowledged.contains_key(identity)
            {
                self.acknowledged.clear();
            }
            self.acknowledged.insert(identity.clone(), *hash);
        }
    }

    pub fn len(&self) -> usize {
        self.acknowledged.len()
    }

    pub fn is_empty(&self) -> bool {
        self.acknowledged.is_empty()
    }
}

/// What one batch emits of the repeating resources: each identity's content once, and none the
/// mapper already had acknowledged.
#[derive(Debug, Default)]
pub struct BatchDevices {
    emitted: Vec<(String, u64)>,
    in_batch: HashSet<(String, u64)>,
}

impl BatchDevices {
    /// Whether a resource of `identity` with content `hash` should be emitted.
    pub fn wanted(&self, known: &Devices, identity: &str, hash: u64) -> bool {
        !known.is_acknowledged(identity, hash)
            && !self.in_batch.contains(&(identity.to_owned(), hash))
    }

    /// Notes resources emitted in this batch.
    pub fn emitted(&mut self, entries: Vec<(String, u64)>) {
        for e in entries {
            if self.in_batch.insert(e.clone()) {
                self.emitted.push(e);
            }
        }
    }

    /// The batch's entries, for `apply`.
    pub fn into_change(self) -> Vec<(String, u64)> {
        self.emitted
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_content_hash_follows_the_content() {
        let a = json!({"resourceType": "Device", "modelNumber": "45", "name": [{"value": "BPM"}]});
        let same =
            json!({"name": [{"value": "BPM"}], "modelNumber": "45", "resourceType": "Device"});
        let other =
            json!({"resourceType": "Device", "modelNumber": "46", "name": [{"value": "BPM"}]});
        assert_eq!(content_hash(&a), content_hash(&same));
        assert_ne!(content_hash(&a), content_hash(&other));
        // Structure counts, not only the leaves.
        assert_ne!(
            content_hash(&json!(["a", "b"])),
            content_hash(&json!([["a"], "b"]))
        );
        assert_ne!(
            content_hash(&json!({"a": 1})),
            content_hash(&json!({"a": "1"}))
        );
    }

    #[test]
    fn test_only_acknowledged_content_is_skipped() {
        let mut known = Devices::default();
        let batch = BatchDevices::default();
        assert!(batch.wanted(&known, "t/Device/d", 1));
        known.remember(&[("t/Device/d".into(), 1)]);
        assert!(!batch.wanted(&known, "t/Device/d", 1));
        // Changed content is emitted again.
        assert!(batch.wanted(&known, "t/Device/d", 2));
        assert!(batch.wanted(&known, "t/Device/e", 1));
    }

    #[test]
    fn test_a_batch_emits_each_content_once_and_hands_it_to_apply() {
        let known = Devices::default();
        let mut batch = BatchDevices::default();
        batch.emitted(vec![("t/Device/d".into(), 1)]);
        assert!(!batch.wanted(&known, "t/Device/d", 1));
        batch.emitted(vec![("t/Device/d".into(), 1), ("t/Device/d".into(), 2)]);
        assert_eq!(
            batch.into_change(),
            vec![("t/Device/d".to_string(), 1), ("t/Device/d".to_string(), 2)]
        );
    }

    fn context(patient: &str) -> Context {
        Context {
            organization_id: "o".into(),
            ehr_target_id: "t".into(),
            patient_id: "p".into(),
            patient_reference: patient.into(),
            provider: "withings".into(),
            link_id: "l".into(),
            provider_user_id: "42".into(),
            sync_request_id: "s".into(),
            trigger: "WEBHOOK".into(),
            received_at: 0,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    fn device(model: Option<&str>) -> Device {
        Device {
            device_id: "d".into(),
            model: model.map(str::to_owned),
            model_id: None,
            manufacturer: None,
        }
    }

    #[test]
    fn test_what_inputs_built_to_is_found_for_exactly_those_inputs() {
        let (ctx, dev) = (context("Patient/1"), device(Some("BPM")));
        let mut built = Built::default();
        let inputs = DeviceInputs::of(&ctx, Some(&dev)).unwrap();
        assert_eq!(built.get(&inputs), None);
        built.remember(&inputs, vec![("t/Device/d".into(), 7)]);
        assert_eq!(
            built.get(&inputs),
            Some(&[("t/Device/d".to_string(), 7)][..])
        );
        // Any input that goes into the resources makes other inputs.
        let moved = context("Patient/2");
        assert_eq!(
            built.get(&DeviceInputs::of(&moved, Some(&dev)).unwrap()),
            None
        );
        let mut r4 = context("Patient/1");
        r4.fhir_version = ohx_common::records::FHIR_R4.into();
        assert_eq!(built.get(&DeviceInputs::of(&r4, Some(&dev)).unwrap()), None);
        for other in [device(None), device(Some("BPM Core"))] {
            assert_eq!(
                built.get(&DeviceInputs::of(&ctx, Some(&other)).unwrap()),
                None
            );
        }
        // A model of "" is not an unknown model.
        let empty = device(Some(""));
        let mut only_empty = Built::default();
        only_empty.remember(&DeviceInputs::of(&ctx, Some(&empty)).unwrap(), vec![]);
        assert_eq!(
            only_empty.get(&DeviceInputs::of(&ctx, Some(&device(None))).unwrap()),
            None
        );
        assert!(DeviceInputs::of(&ctx, None).is_none());
    }

    #[test]
    fn test_device_resources_are_left_out_only_when_every_one_would_be_dropped() {
        let (ctx, dev) = (context("Patient/1"), device(Some("BPM")));
        let inputs = DeviceInputs::of(&ctx, Some(&dev)).unwrap();
        let mut built = Built::default();
        let mut known = Devices::default();
        let batch = BatchDevices::default();
        assert!(
            !built.all_dropped(Some(&inputs), &known, &batch),
            "not built yet"
        );
        built.remember(
            &inputs,
            vec![
                ("t/Device/d".into(), 1),
                ("t/DeviceAssociation/a".into(), 2),
            ],
        );
        assert!(!built.all_dropped(Some(&inputs), &known, &batch));
        known.remember(&[("t/Device/d".into(), 1)]);
        assert!(
            !built.all_dropped(Some(&inputs), &known, &batch),
            "the association is not acknowledged"
        );
        let mut in_batch = BatchDevices::default();
        in_batch.emitted(vec![("t/DeviceAssociation/a".into(), 2)]);
        assert!(built.all_dropped(Some(&inputs), &known, &in_batch));
        known.remember(&[("t/DeviceAssociation/a".into(), 2)]);
        assert!(built.all_dropped(Some(&inputs), &known, &batch));
        assert!(!built.all_dropped(None, &known, &batch), "no device");
    }

    #[test]
    fn test_the_memo_is_bounded() {
        let ctx = context("Patient/1");
        let (a, b) = (device(Some("a")), device(Some("b")));
        let mut built = Built::with_capacity(1);
        built.remember(&DeviceInputs::of(&ctx, Some(&a)).unwrap(), vec![]);
        built.remember(&DeviceInputs::of(&ctx, Some(&b)).unwrap(), vec![]);
        assert!(
            built
                .get(&DeviceInputs::of(&ctx, Some(&a)).unwrap())
                .is_none()
        );
        assert!(
            built
                .get(&DeviceInputs::of(&ctx, Some(&b)).unwrap())
                .is_some()
        );
    }

    #[test]
    fn test_the_memory_is_bounded() {
        let mut known = Devices::with_capacity(2);
        known.remember(&[("a".into(), 1), ("b".into(), 1)]);
        assert_eq!(known.len(), 2);
        known.remember(&[("c".into(), 1)]);
        assert_eq!(known.len(), 1);
        assert!(known.is_acknowledged("c", 1));
        assert!(!known.is_acknowledged("a", 1));
        // Updating a remembered identity never counts against the bound.
        known.remember(&[("c".into(), 2)]);
        assert!(known.is_acknowledged("c", 2));
    }
}
