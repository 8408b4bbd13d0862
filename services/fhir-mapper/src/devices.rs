//! Device and DeviceAssociation resources already acknowledged by the broker, so that a
//! measurement whose device is unchanged emits only its Observation.
//!
//! Every Withings measurement names its device; mapped naively, each one yields a Device and a
//! DeviceAssociation identical to the previous ones, which are validated, encoded and produced
//! only for the deduplicator to drop them. The mapper remembers, per identity, a hash of the
//! content it had acknowledged and skips repeats. It learns only through the processor's
//! `apply` (after the broker acknowledged the batch), so a retried batch emits them again; and
//! it starts empty after a restart or rebalance, which costs one repeat per device.

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
