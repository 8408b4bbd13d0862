//! A resource as the publisher holds it: its top-level members, each kept as its JSON text.
//!
//! Writing a resource as it came needs no more than that (the transaction only adds ohx's tags
//! to `meta`), so the members are parsed only where one is looked into: `meta` when tagging,
//! `identifier` for a conditional upsert, the members that hold a `reference` when looking for
//! references to resources ohx writes. Parsing every resource into a full tree cost more than
//! half of the publisher's step.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A JSON object's members, keys sorted (as `serde_json::Map` keeps them), values as text.
#[derive(Debug, Clone, Default)]
pub struct Resource(BTreeMap<String, Box<RawValue>>);

impl Resource {
    /// Parses (and so checks) a resource's JSON text; it must be an object.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text).map(Self)
    }

    /// The resource of a parsed object.
    pub fn from_object(object: Map<String, Value>) -> Result<Self, serde_json::Error> {
        object
            .into_iter()
            .map(|(k, v)| Ok((k, serde_json::value::to_raw_value(&v)?)))
            .collect::<Result<_, serde_json::Error>>()
            .map(Self)
    }

    /// A member, parsed; `None` if it is absent (or not JSON, which [`Resource::parse`] rules
    /// out).
    pub fn member(&self, key: &str) -> Option<Value> {
        serde_json::from_str(self.0.get(key)?.get()).ok()
    }

    /// How many members it has.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it has no member.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the resource has `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The members in key order, as text.
    pub fn members(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    /// The members whose text holds `needle` (e.g. `"reference"`) or any escape (which could
    /// spell it otherwise), parsed.
    pub fn members_holding<'a>(
        &'a self,
        needle: &'a str,
    ) -> impl Iterator<Item = (&'a str, Value)> + 'a {
        self.0
            .iter()
            .filter(move |(_, v)| v.get().contains(needle) || v.get().contains('\\'))
            .filter_map(|(k, v)| Some((k.as_str(), serde_json::from_str(v.get()).ok()?)))
    }

    /// The whole resource, parsed.
    pub fn to_value(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), serde_json::from_str(v.get()).ok()?)))
                .collect(),
        )
    }

    /// Sets a member (tests build resources with it).
    #[cfg(test)]
    pub fn set(&mut self, key: &str, value: Value) {
        if let Ok(raw) = serde_json::value::to_raw_value(&value) {
            self.0.insert(key.to_owned(), raw);
        }
    }
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl From<Value> for Resource {
    /// An object's members; anything else gives an empty resource (tests build resources
    /// with `json!`).
    fn from(value: Value) -> Self {
        match value {
            Value::Object(object) => Self::from_object(object).unwrap_or_default(),
            _ => Self::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_a_resource_serializes_as_the_object_it_was_parsed_from() {
        let text = r#"{"resourceType":"Observation","id":"a","valueQuantity":{"value":1.50,"unit":"kg"},"status":"final"}"#;
        let r = Resource::parse(text).unwrap();
        let back = serde_json::to_string(&r).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&back).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
        // The decimal keeps its digits (written as it came, not re-rendered).
        assert!(back.contains(r#""value":1.50"#), "{back}");
        assert_eq!(r.to_value(), serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn test_only_objects_of_valid_json_parse() {
        for bad in ["[1]", "\"x\"", "{\"a\":", "{\"a\":tru}", "{\"a\":1}x", ""] {
            assert!(Resource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_members_are_parsed_on_demand() {
        let r = Resource::from(json!({"id": "a", "device": {"reference": "Device/d"},
            "subject": {"reference": "Patient/p"}, "status": "final"}));
        assert_eq!(r.member("status"), Some(json!("final")));
        assert_eq!(r.member("absent"), None);
        assert!(r.contains("id") && !r.contains("meta"));
        let holding: Vec<&str> = r.members_holding("\"reference\"").map(|(k, _)| k).collect();
        assert_eq!(holding, ["device", "subject"]);
        let escaped =
            Resource::parse(r#"{"device":{"refer\u0065nce":"Device/d"},"id":"a"}"#).unwrap();
        let holding: Vec<Value> = escaped
            .members_holding("\"reference\"")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(holding, [json!({"reference": "Device/d"})]);
        assert_eq!(
            r.members().map(|(k, _)| k).collect::<Vec<_>>(),
            ["device", "id", "status", "subject"]
        );
    }
}
