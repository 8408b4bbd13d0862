//! Schema validation by shape: the full R5 JSON schema runs once per shape of resource, and
//! every later resource of that shape has only its leaves checked.
//!
//! The R5 schema's verdict on a resource depends on two things only: its structure (which
//! elements, how many items, which JSON type at each leaf) and the values at its leaves
//! (`pattern`, `const` and `enum`). That holds because the schema uses no other keywords than
//! `$ref`, `type`, `properties`, `additionalProperties`, `required`, `items`, `pattern`,
//! `const`, `enum` and `description`, and `oneOf` only in the list of all resources (which
//! [`Shapes::new`] checks: any other keyword, or a `type` other than the five plain ones, turns
//! this off).
//!
//! So once a resource passed the full schema, its shape is remembered with, for each leaf in
//! walk order, the leaf's rules (every `pattern`, `const` and `enum` along its `$ref` chain,
//! each compiled by jsonschema itself, so the regex dialect is the validator's). A resource of
//! a remembered shape whose leaves all pass is valid. Anything else (a new shape, a leaf that
//! fails, a shape that reaches the root's `oneOf`) goes to the full schema, whose verdict and
//! messages stand: this layer can only say "valid", never "invalid".

use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

/// Most shapes remembered; past it the memory starts over (a new shape only costs one full
/// validation).
const MAX_SHAPES: usize = 10_000;

/// Schema keywords whose effect [`Shapes`] accounts for.
const KNOWN_KEYWORDS: [&str; 10] = [
    "$ref",
    "type",
    "properties",
    "additionalProperties",
    "required",
    "items",
    "pattern",
    "const",
    "enum",
    "description",
];

/// JSON types the shape key tells apart (`integer` would need the number's value).
const KNOWN_TYPES: [&str; 5] = ["object", "array", "string", "number", "boolean"];

/// The rules on one leaf: each a small validator (`{"pattern": …}`, `{"const": …}` or
/// `{"enum": …}`) the leaf's value must pass.
#[derive(Default)]
struct LeafRules(Vec<Arc<jsonschema::Validator>>);

impl LeafRules {
    fn accepts(&self, value: &Value) -> bool {
        self.0.iter().all(|rule| rule.is_valid(value))
    }
}

/// The leaves' rules of one shape, in walk order, with the leaves of the resource it was learnt
/// from: a leaf equal to that one's passed already (most leaves are codes, systems and units
/// that every resource of a shape repeats).
struct Plan {
    rules: Vec<Arc<LeafRules>>,
    accepted: Vec<Value>,
}

/// Shapes that passed the full schema, and the rules of their leaves.
pub struct Shapes {
    definitions: Map<String, Value>,
    /// Compiled leaf rules by the rule's JSON (each pattern compiled once).
    rules: RwLock<HashMap<String, Arc<jsonschema::Validator>>>,
    leaf_rules: RwLock<HashMap<String, Arc<LeafRules>>>,
    plans: RwLock<HashMap<Vec<u8>, Arc<Plan>>>,
    enabled: bool,
}

impl Shapes {
    /// Reads the schema's `definitions`; shapes are remembered only if every definition uses
    /// the keywords this layer accounts for.
    pub fn new(definitions: &Map<String, Value>) -> Self {
        let enabled = definitions.values().all(uses_known_keywords);
        Self {
            definitions: definitions.clone(),
            rules: RwLock::default(),
            leaf_rules: RwLock::default(),
            plans: RwLock::default(),
            enabled,
        }
    }

    /// Whether shapes are remembered at all (the schema uses only known keywords).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// How many shapes are remembered.
    pub fn len(&self) -> usize {
        read(&self.plans).len()
    }

    /// Whether no shape is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `true` when `resource`'s shape is remembered and each of its leaves passes its rules:
    /// the full schema would accept it. `false` says nothing (validate fully).
    pub fn accepts(&self, resource: &Value) -> bool {
        if !self.enabled {
            return false;
        }
        let mut key = Vec::with_capacity(512);
        let mut leaves = Vec::with_capacity(48);
        shape_of(resource, &mut key, &mut leaves);
        let Some(plan) = read(&self.plans).get(&key).cloned() else {
            return false;
        };
        plan.rules.len() == leaves.len()
            && plan
                .rules
                .iter()
                .zip(&plan.accepted)
                .zip(&leaves)
                .all(|((rules, accepted), leaf)| accepted == *leaf || rules.accepts(leaf))
    }

    /// Remembers the shape of `resource`, which the full schema for `#/definitions/{type}`
    /// has just accepted. Shapes whose rules cannot be told (an element under the root's
    /// `oneOf`, such as contained resources) are not remembered.
    pub fn learn(&self, resource_type: &str, resource: &Value) {
        if !self.enabled {
            return;
        }
        let Some(schema) = self.definitions.get(resource_type) else {
            return;
        };
        let mut leaves = Vec::new();
        if self.plan_of(resource, schema, &mut leaves).is_none() {
            return;
        }
        let mut key = Vec::with_capacity(512);
        let mut values = Vec::new();
        shape_of(resource, &mut key, &mut values);
        let plan = Plan {
            rules: leaves,
            accepted: values.into_iter().cloned().collect(),
        };
        let mut plans = write(&self.plans);
        if plans.len() >= MAX_SHAPES {
            plans.clear();
        }
        plans.insert(key, Arc::new(plan));
    }

    /// The rules of each leaf of `value` under `schema`, in walk order; `None` when a part of
    /// the value has no schema this layer can follow.
    fn plan_of(&self, value: &Value, schema: &Value, out: &mut Vec<Arc<LeafRules>>) -> Option<()> {
        let chain = self.chain(schema)?;
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let sub = chain
                        .iter()
                        .find_map(|s| s.get("properties").and_then(|p| p.get(key)))?;
                    self.plan_of(child, sub, out)?;
                }
            }
            Value::Array(items) => {
                let sub = chain.iter().find_map(|s| s.get("items"))?;
                for item in items {
                    self.plan_of(item, sub, out)?;
                }
            }
            _ => out.push(self.leaf_rules(&chain)?),
        }
        Some(())
    }

    /// `schema` and every schema its `$ref`s lead to; `None` for a `oneOf` or a reference
    /// outside `#/definitions`.
    fn chain<'a>(&'a self, mut schema: &'a Value) -> Option<Vec<&'a Value>> {
        let mut chain = Vec::new();
        loop {
            if schema.get("oneOf").is_some() || chain.len() > 16 {
                return None;
            }
            chain.push(schema);
            let Some(reference) = schema.get("$ref").and_then(Value::as_str) else {
                return Some(chain);
            };
            let name = reference.strip_prefix("#/definitions/")?;
            schema = self.definitions.get(name)?;
        }
    }

    /// The rules of a leaf: every `pattern`, `const` and `enum` along its chain.
    fn leaf_rules(&self, chain: &[&Value]) -> Option<Arc<LeafRules>> {
        let mut specs = Vec::new();
        for schema in chain {
            for keyword in ["pattern", "const", "enum"] {
                if let Some(value) = schema.get(keyword) {
                    let mut spec = Map::new();
                    spec.insert(keyword.to_owned(), value.clone());
                    specs.push(Value::Object(spec).to_string());
                }
            }
        }
        let key = specs.join("\u{0}");
        if let Some(known) = read(&self.leaf_rules).get(&key) {
            return Some(known.clone());
        }
        let mut rules = Vec::with_capacity(specs.len());
        for spec in &specs {
            rules.push(self.rule(spec)?);
        }
        let rules = Arc::new(LeafRules(rules));
        write(&self.leaf_rules).insert(key, rules.clone());
        Some(rules)
    }

    fn rule(&self, spec: &str) -> Option<Arc<jsonschema::Validator>> {
        if let Some(known) = read(&self.rules).get(spec) {
            return Some(known.clone());
        }
        let schema: Value = serde_json::from_str(spec).ok()?;
        let validator = Arc::new(jsonschema::draft6::options().build(&schema).ok()?);
        write(&self.rules).insert(spec.to_owned(), validator.clone());
        Some(validator)
    }
}

impl std::fmt::Debug for Shapes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shapes")
            .field("enabled", &self.enabled)
            .field("shapes", &self.len())
            .finish()
    }
}

/// The shape of a value (object keys, item counts, the JSON type of each leaf) as bytes, and
/// its leaves in walk order.
fn shape_of<'a>(value: &'a Value, key: &mut Vec<u8>, leaves: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            key.push(b'{');
            for (name, child) in map {
                // Length-prefixed, so no name can imitate the structure around it.
                key.extend_from_slice(&(name.len() as u32).to_le_bytes());
                key.extend_from_slice(name.as_bytes());
                shape_of(child, key, leaves);
            }
            key.push(b'}');
        }
        Value::Array(items) => {
            key.push(b'[');
            for item in items {
                shape_of(item, key, leaves);
            }
            key.push(b']');
        }
        Value::String(_) => {
            key.push(b's');
            leaves.push(value);
        }
        Value::Number(_) => {
            key.push(b'n');
            leaves.push(value);
        }
        Value::Bool(_) => {
            key.push(b'b');
            leaves.push(value);
        }
        Value::Null => {
            key.push(b'z');
            leaves.push(value);
        }
    }
}

/// Whether a definition (and every schema inside it) uses only [`KNOWN_KEYWORDS`] and
/// [`KNOWN_TYPES`], with `additionalProperties` only `false`.
fn uses_known_keywords(schema: &Value) -> bool {
    let Some(object) = schema.as_object() else {
        return false;
    };
    object
        .iter()
        .all(|(keyword, value)| match keyword.as_str() {
            "properties" => value
                .as_object()
                .is_some_and(|p| p.values().all(uses_known_keywords)),
            "items" => uses_known_keywords(value),
            "type" => value.as_str().is_some_and(|t| KNOWN_TYPES.contains(&t)),
            "additionalProperties" => value == &Value::Bool(false),
            // Only the list of all resources has it; shapes reaching it are never remembered.
            "oneOf" => true,
            "required" => value.as_array().is_some_and(|r| {
                let names: BTreeSet<_> = r.iter().filter_map(Value::as_str).collect();
                names.len() == r.len()
            }),
            other => KNOWN_KEYWORDS.contains(&other),
        })
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::validate::shared_test_validator;
    use serde_json::json;

    /// Fresh shapes over the schema the validator uses; the validator's full schema check
    /// is the oracle.
    fn fresh() -> Shapes {
        Shapes::new(&shared_test_validator().shapes().definitions)
    }

    fn full(resource: &Value) -> bool {
        shared_test_validator().schema_accepts(resource)
    }

    fn bp(id: &str, when: &str, systolic: i64) -> Value {
        json!({
            "resourceType": "Observation", "id": id,
            "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/bp"], "source": "https://ohx.example/fhir/source/withings"},
            "identifier": [{"system": "https://ohx.example/fhir/sid/observation", "value": format!("withings-4242-{id}")}],
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": when,
            "device": {"reference": "Device/ohx-1"},
            "component": [
                {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                 "valueQuantity": {"value": systolic, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                 "valueQuantity": {"value": 80, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
            ]
        })
    }

    fn device(id: &str) -> Value {
        json!({
            "resourceType": "Device", "id": id, "status": "active", "manufacturer": "Withings",
            "displayName": "Withings BPM Connect", "name": [{"value": "BPM Connect", "type": "model-name"}],
            "identifier": [{"system": "https://ohx.example/fhir/sid/device", "value": "withings-bpm"}],
            "meta": {"source": "https://ohx.example/fhir/source/withings"}, "modelNumber": "45"
        })
    }

    fn association(id: &str) -> Value {
        json!({
            "resourceType": "DeviceAssociation", "id": id,
            "meta": {"source": "https://ohx.example/fhir/source/withings"},
            "identifier": [{"system": "https://ohx.example/fhir/sid/device-association", "value": "withings-4242-bpm"}],
            "device": {"reference": "Device/ohx-1"},
            "status": {"coding": [{"system": "http://hl7.org/fhir/deviceassociation-status", "code": "attached"}]},
            "subject": {"reference": "Patient/p1"}
        })
    }

    fn learnt(shapes: &Shapes, resource: &Value) {
        assert!(full(resource), "the base resource is valid");
        let resource_type = resource["resourceType"].as_str().unwrap();
        shapes.learn(resource_type, resource);
    }

    /// Every way to break a leaf the tests try: patterns (id, code, string, uri, dateTime),
    /// fixed values and JSON types.
    fn bad_leaves() -> Vec<Value> {
        vec![
            json!(""),
            json!(" "),
            json!("two  spaces"),
            json!(" leading"),
            json!("trailing "),
            json!("tab\there"),
            json!("line\nbreak"),
            json!("ohx-٣"),
            json!("2025-13-01T00:00:00Z"),
            json!("2025-06-01T24:00:00Z"),
            json!("2025-06-01T10:00:00+15:00"),
            json!("x".repeat(65)),
            json!("Patient/has space"),
            json!("Observatio"),
            json!("finalx"),
            json!(1),
            json!(true),
            json!(null),
            json!("ok-value"),
            json!("2025-06-01T10:00:00Z"),
        ]
    }

    /// Replaces the `n`th leaf (walk order) of `value`; `false` when it has fewer.
    fn replace_leaf(value: &mut Value, n: &mut usize, with: &Value) -> bool {
        match value {
            Value::Object(map) => map.values_mut().any(|v| replace_leaf(v, n, with)),
            Value::Array(items) => items.iter_mut().any(|v| replace_leaf(v, n, with)),
            leaf => {
                if *n == 0 {
                    *leaf = with.clone();
                    true
                } else {
                    *n -= 1;
                    false
                }
            }
        }
    }

    #[test]
    fn test_the_r5_schema_uses_only_keywords_shapes_account_for() {
        assert!(fresh().enabled());
    }

    #[test]
    fn test_another_resource_of_a_learnt_shape_is_accepted_by_its_leaves() {
        let shapes = fresh();
        assert!(!shapes.accepts(&bp("ohx-a", "2025-06-01T10:00:00+02:00", 120)));
        learnt(&shapes, &bp("ohx-a", "2025-06-01T10:00:00+02:00", 120));
        assert_eq!(shapes.len(), 1);
        assert!(shapes.accepts(&bp("ohx-b", "2026-01-31T23:59:59Z", 141)));
    }

    #[test]
    fn test_a_new_shape_is_not_accepted_until_the_full_schema_accepted_it() {
        let shapes = fresh();
        learnt(&shapes, &bp("ohx-a", "2025-06-01T10:00:00Z", 120));
        let mut other = bp("ohx-b", "2025-06-01T10:00:00Z", 120);
        other["note"] = json!([{"text": "n"}]);
        assert!(!shapes.accepts(&other), "an added element");
        let mut fewer = bp("ohx-b", "2025-06-01T10:00:00Z", 120);
        fewer["component"].as_array_mut().unwrap().pop();
        assert!(!shapes.accepts(&fewer), "an item fewer");
        let mut unknown = bp("ohx-b", "2025-06-01T10:00:00Z", 120);
        unknown["valueFoo"] = json!("x");
        assert!(!shapes.accepts(&unknown), "an unknown element");
        assert!(!full(&unknown));
    }

    /// The one property this layer must have: whatever it accepts, the full schema accepts.
    /// Every leaf of each learnt resource is replaced by every bad (and some good) value.
    #[test]
    fn test_whatever_shapes_accept_the_full_schema_accepts() {
        let shapes = fresh();
        let bases = [
            bp("ohx-a", "2025-06-01T10:00:00+02:00", 120),
            device("ohx-d"),
            association("ohx-x"),
        ];
        let mut checked = 0;
        let mut accepted = 0;
        let mut rejected = 0;
        for base in &bases {
            learnt(&shapes, base);
            for with in bad_leaves() {
                for index in 0.. {
                    let mut mutated = base.clone();
                    if !replace_leaf(&mut mutated, &mut index.clone(), &with) {
                        break;
                    }
                    let fast = shapes.accepts(&mutated);
                    let oracle = full(&mutated);
                    assert!(
                        !fast || oracle,
                        "shapes accepted what the schema rejects: leaf {index} of {} = {with}",
                        base["resourceType"]
                    );
                    checked += 1;
                    accepted += usize::from(fast);
                    rejected += usize::from(!oracle);
                }
            }
        }
        assert!(checked > 500, "{checked} cases");
        assert!(
            rejected > 100,
            "the cases include invalid ones ({rejected})"
        );
        assert!(accepted > 100, "shapes do accept valid ones ({accepted})");
    }

    #[test]
    fn test_a_bad_leaf_of_a_learnt_shape_is_left_to_the_full_schema() {
        let shapes = fresh();
        learnt(&shapes, &bp("ohx-a", "2025-06-01T10:00:00Z", 120));
        for (id, when) in [
            ("bad id", "2025-06-01T10:00:00Z"),
            ("ohx-b", "2025-06-01 10:00"),
            ("ohx-b", "2025-02-30T10:00:00"),
        ] {
            let resource = bp(id, when, 120);
            assert_eq!(shapes.accepts(&resource), full(&resource), "{id} {when}");
        }
        let mut wrong_type = bp("ohx-b", "2025-06-01T10:00:00Z", 120);
        wrong_type["resourceType"] = json!("Device");
        assert!(
            !shapes.accepts(&wrong_type),
            "resourceType is a fixed value"
        );
    }

    #[test]
    fn test_shapes_are_off_for_a_schema_with_keywords_they_do_not_account_for() {
        let mut definitions = shared_test_validator().shapes().definitions.clone();
        assert!(Shapes::new(&definitions).enabled());
        definitions.insert("Extra".into(), json!({"type": "array", "minItems": 1}));
        let shapes = Shapes::new(&definitions);
        assert!(!shapes.enabled());
        shapes.learn("Observation", &bp("ohx-a", "2025-06-01T10:00:00Z", 120));
        assert!(!shapes.accepts(&bp("ohx-a", "2025-06-01T10:00:00Z", 120)));
        let integer = json!({"properties": {"n": {"type": "integer"}}});
        assert!(!uses_known_keywords(&integer));
    }

    #[test]
    fn test_a_shape_under_the_list_of_all_resources_is_not_learnt() {
        let shapes = fresh();
        let mut contained = bp("ohx-a", "2025-06-01T10:00:00Z", 120);
        contained["contained"] = json!([device("d1")]);
        learnt(&shapes, &contained);
        assert!(shapes.is_empty());
    }
}
