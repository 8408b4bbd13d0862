//! R4 output: the R5 resources of one record rewritten for an EHR target that speaks FHIR R4
//! (4.0.1), by the cross-version rules of `r4.toml` (data, like the mapping table). A pure
//! function: [`R4Rules::convert`]. What comes out is validated against the R4 schema and
//! profile rules ([`crate::validate::FhirValidator`] for [`FhirVersion::R4`]) before it leaves.
//!
//! [`FhirVersion::R4`]: crate::validate::FhirVersion::R4

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::map::MappedResource;

/// The built-in rules (`services/fhir-mapper/r4.toml`).
pub const DEFAULT_RULES_TOML: &str = include_str!("../r4.toml");

/// The rules format this build understands (the `format` key).
pub const RULES_FORMAT: u32 = 1;

/// UCUM time units and their length in milliseconds (the `milliseconds` rule).
const UCUM_MILLISECONDS: [(&str, f64); 6] = [
    ("us", 0.001),
    ("ms", 1.0),
    ("s", 1_000.0),
    ("min", 60_000.0),
    ("h", 3_600_000.0),
    ("d", 86_400_000.0),
];

/// Why the rules could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Not TOML, or not the rules' shape (unknown keys are errors).
    #[error("R4 rules are not valid TOML of the expected shape: {0}")]
    Parse(#[from] toml::de::Error),
    /// Parsed, but a rule is broken (named in the message).
    #[error("R4 rules are invalid: {0}")]
    Invalid(String),
}

/// Why a record's resources could not be written as R4.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// A `milliseconds` element whose unit is missing or not a UCUM time unit.
    #[error("{path}: unit {unit:?} is not a UCUM time unit, so R4 has no period for it")]
    TimeUnit {
        /// The R5 element path.
        path: String,
        /// The unit found (`None`: none).
        unit: Option<String>,
    },
    /// A `milliseconds` element that is not a number.
    #[error("{path}: not a number")]
    NotANumber {
        /// The R5 element path.
        path: String,
    },
}

/// `[[links]]`: content of a resource R4 lacks moved into the resource it references.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRule {
    /// `<Type>.<element>` copied.
    pub from: String,
    /// `<Type>.<element>`: the Reference to the receiving resource.
    pub via: String,
    /// `<Type>.<element>` written.
    pub to: String,
}

/// `[[elements]]`: what becomes of one R5 element in R4.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElementRule {
    /// R5 element paths `<Type>.<element>…`.
    pub paths: Vec<String>,
    /// The element's R4 name.
    #[serde(default)]
    pub rename: Option<String>,
    /// R4 has no such element.
    #[serde(default)]
    pub drop: bool,
    /// The cross-version extension URL the value moves to.
    #[serde(default)]
    pub extension: Option<String>,
    /// The extension's `value[x]` key.
    #[serde(default)]
    pub value: Option<String>,
    /// The sibling holding the element's UCUM time unit.
    #[serde(default)]
    pub milliseconds: Option<String>,
    /// With `milliseconds`: the R4 element written.
    #[serde(default)]
    pub to: Option<String>,
}

/// What a rule does to the element at the end of its path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Rename(String),
    Drop,
    Extension { url: String, value_key: String },
    Milliseconds { unit: String, to: String },
}

/// One element rule for one path, split into segments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PathRule {
    resource_type: String,
    /// Elements from the resource down to the parent of the changed element.
    parents: Vec<String>,
    element: String,
    action: Action,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    format: u32,
    #[serde(default)]
    drop_types: Vec<String>,
    #[serde(default)]
    links: Vec<LinkRule>,
    #[serde(default)]
    elements: Vec<ElementRule>,
}

/// The checked cross-version rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R4Rules {
    drop_types: Vec<String>,
    links: Vec<LinkRule>,
    /// Deepest first, then in file order.
    rules: Vec<PathRule>,
}

impl R4Rules {
    /// The built-in rules compiled from `r4.toml`.
    pub fn default_rules() -> Result<Self, RulesError> {
        Self::from_toml_str(DEFAULT_RULES_TOML)
    }

    /// Parses and checks rules from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, RulesError> {
        let file: RulesFile = toml::from_str(text)?;
        if file.format != RULES_FORMAT {
            return invalid(format!(
                "format {} is not supported (expected {RULES_FORMAT})",
                file.format
            ));
        }
        for link in &file.links {
            for path in [&link.from, &link.via, &link.to] {
                if split_path(path).is_none_or(|segments| segments.len() != 2) {
                    return invalid(format!("link path `{path}` is not <Type>.<element>"));
                }
            }
            if type_of(&link.from) != type_of(&link.via) {
                return invalid(format!(
                    "link `{}` and `{}` name different resource types",
                    link.from, link.via
                ));
            }
        }
        let mut rules = Vec::new();
        for element in &file.elements {
            let action = action_of(element)?;
            if element.paths.is_empty() {
                return invalid("an element rule has no paths".to_owned());
            }
            for path in &element.paths {
                let Some(mut segments) = split_path(path).filter(|s| s.len() >= 2) else {
                    return invalid(format!("element path `{path}` is not <Type>.<element>…"));
                };
                let element = segments.pop().unwrap_or_default();
                let resource_type = segments.remove(0);
                rules.push(PathRule {
                    resource_type,
                    parents: segments,
                    element,
                    action: action.clone(),
                });
            }
        }
        // Children before their parents, so a rule names elements by their R5 names.
        rules.sort_by_key(|r| std::cmp::Reverse(r.parents.len()));
        Ok(Self {
            drop_types: file.drop_types,
            links: file.links,
            rules,
        })
    }

    /// The R4 form of one record's R5 resources: links applied, resource types R4 lacks left
    /// out, every element rule applied. Ids stay as they are.
    pub fn convert(
        &self,
        resources: Vec<MappedResource>,
    ) -> Result<Vec<MappedResource>, ConversionError> {
        let mut resources = resources;
        for link in &self.links {
            apply_link(link, &mut resources);
        }
        resources.retain(|r| !self.drop_types.contains(&r.resource_type));
        for resource in &mut resources {
            for rule in &self.rules {
                if rule.resource_type == resource.resource_type {
                    apply_rule(rule, &mut resource.json)?;
                }
            }
        }
        Ok(resources)
    }
}

fn invalid<T>(message: String) -> Result<T, RulesError> {
    Err(RulesError::Invalid(message))
}

fn action_of(rule: &ElementRule) -> Result<Action, RulesError> {
    let at = rule.paths.join(", ");
    let action = match (&rule.rename, rule.drop, &rule.extension, &rule.milliseconds) {
        (Some(to), false, None, None) => Action::Rename(to.clone()),
        (None, true, None, None) => Action::Drop,
        (None, false, Some(url), None) => {
            let Some(value_key) = rule.value.clone().filter(|v| is_value_key(v)) else {
                return invalid(format!("{at}: an extension needs value = \"value<Type>\""));
            };
            Action::Extension {
                url: url.clone(),
                value_key,
            }
        }
        (None, false, None, Some(unit)) => {
            let Some(to) = rule.to.clone() else {
                return invalid(format!("{at}: milliseconds needs `to`"));
            };
            Action::Milliseconds {
                unit: unit.clone(),
                to,
            }
        }
        _ => {
            return invalid(format!(
                "{at}: needs exactly one of rename, drop, extension, milliseconds"
            ));
        }
    };
    let stray_value = rule.value.is_some() && !matches!(action, Action::Extension { .. });
    let stray_to = rule.to.is_some() && !matches!(action, Action::Milliseconds { .. });
    if stray_value || stray_to {
        return invalid(format!(
            "{at}: `value` is for extension, `to` for milliseconds"
        ));
    }
    Ok(action)
}

fn is_value_key(key: &str) -> bool {
    key.strip_prefix("value")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
}

fn split_path(path: &str) -> Option<Vec<String>> {
    let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
    segments
        .iter()
        .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
        .then_some(segments)
}

fn type_of(path: &str) -> &str {
    path.split('.').next().unwrap_or_default()
}

fn element_of(path: &str) -> &str {
    path.split('.').nth(1).unwrap_or_default()
}

fn apply_link(link: &LinkRule, resources: &mut [MappedResource]) {
    let (from_type, to_type) = (type_of(&link.from), type_of(&link.to));
    let moves: Vec<(String, Value)> = resources
        .iter()
        .filter(|r| r.resource_type == from_type)
        .filter_map(|r| {
            let value = r.json.get(element_of(&link.from))?.clone();
            let target = r
                .json
                .get(element_of(&link.via))?
                .get("reference")?
                .as_str()?
                .strip_prefix(to_type)?
                .strip_prefix('/')?
                .to_owned();
            Some((target, value))
        })
        .collect();
    for (target, value) in moves {
        for r in resources.iter_mut() {
            if r.resource_type == to_type
                && r.id == target
                && let Some(object) = r.json.as_object_mut()
            {
                object.insert(element_of(&link.to).to_owned(), value.clone());
            }
        }
    }
}

fn apply_rule(rule: &PathRule, resource: &mut Value) -> Result<(), ConversionError> {
    let mut parents = vec![resource];
    for segment in &rule.parents {
        parents = parents
            .into_iter()
            .filter_map(|p| p.get_mut(segment.as_str()))
            .flat_map(|child| match child {
                Value::Array(items) => items.iter_mut().collect::<Vec<_>>(),
                other => vec![other],
            })
            .collect();
    }
    for parent in parents {
        if let Value::Array(items) = parent {
            for item in items.iter_mut().filter_map(Value::as_object_mut) {
                apply_action(rule, item)?;
            }
        } else if let Some(object) = parent.as_object_mut() {
            apply_action(rule, object)?;
        }
    }
    Ok(())
}

fn apply_action(rule: &PathRule, parent: &mut Map<String, Value>) -> Result<(), ConversionError> {
    // Elements are single values or arrays of them; the rule applies to each object of an
    // array element by walking into it (see apply_rule), and to the element itself here.
    let Some(value) = parent.remove(&rule.element) else {
        return Ok(());
    };
    match &rule.action {
        Action::Rename(to) => {
            parent.insert(to.clone(), value);
        }
        Action::Drop => {}
        Action::Extension { url, value_key } => {
            let extension = serde_json::json!({ "url": url, value_key.as_str(): value });
            match parent.get_mut("extension") {
                Some(Value::Array(extensions)) => extensions.push(extension),
                _ => {
                    parent.insert("extension".to_owned(), Value::Array(vec![extension]));
                }
            }
        }
        Action::Milliseconds { unit, to } => {
            let path = || format!("{}.{}", rule.path_prefix(), rule.element);
            let unit_code = parent.remove(unit);
            let factor = unit_code
                .as_ref()
                .and_then(Value::as_str)
                .and_then(|u| UCUM_MILLISECONDS.iter().find(|(code, _)| *code == u))
                .map(|(_, factor)| *factor)
                .ok_or_else(|| ConversionError::TimeUnit {
                    path: path(),
                    unit: unit_code
                        .as_ref()
                        .map(|u| u.as_str().map_or_else(|| u.to_string(), str::to_owned)),
                })?;
            let milliseconds = value
                .as_f64()
                // Integral milliseconds without a fraction (30 s: `30000`), as the mapper writes.
                .and_then(|v| crate::map::decimal(v * factor, None))
                .ok_or_else(|| ConversionError::NotANumber { path: path() })?;
            parent.insert(to.clone(), Value::Number(milliseconds));
        }
    }
    Ok(())
}

impl PathRule {
    fn path_prefix(&self) -> String {
        std::iter::once(self.resource_type.as_str())
            .chain(self.parents.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(".")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resource(json: Value) -> MappedResource {
        MappedResource {
            resource_type: json["resourceType"].as_str().unwrap().to_owned(),
            id: json["id"].as_str().unwrap().to_owned(),
            json,
        }
    }

    fn device_and_association() -> Vec<MappedResource> {
        vec![
            resource(json!({
                "resourceType": "Device", "id": "d1", "status": "active",
                "identifier": [{ "system": "https://ohx.example/fhir/sid/device", "value": "withings-abc" }],
                "manufacturer": "Withings", "displayName": "Withings BPM Connect",
                "name": [{ "value": "BPM Connect", "type": "user-friendly-name" }],
                "modelNumber": "BPM Connect",
            })),
            resource(json!({
                "resourceType": "DeviceAssociation", "id": "a1",
                "device": { "reference": "Device/d1" },
                "status": { "coding": [{ "system": "http://hl7.org/fhir/deviceassociation-status", "code": "attached" }] },
                "subject": { "reference": "Patient/7" },
            })),
            resource(json!({
                "resourceType": "Observation", "id": "o1", "status": "final",
                "code": { "coding": [{ "system": "http://loinc.org", "code": "85354-9" }] },
                "device": { "reference": "Device/d1" },
            })),
        ]
    }

    fn rules() -> R4Rules {
        R4Rules::default_rules().unwrap()
    }

    #[test]
    fn test_the_default_rules_load() {
        let rules = rules();
        assert_eq!(rules.drop_types, ["DeviceAssociation"]);
        assert_eq!(rules.links.len(), 1);
        // Children first: Device.name.value is renamed before Device.name.
        let device_name = |e: &str| {
            rules
                .rules
                .iter()
                .position(|r| r.resource_type == "Device" && r.element == e)
                .unwrap()
        };
        assert!(device_name("value") < device_name("name"));
    }

    #[test]
    fn test_the_device_links_to_its_patient_and_the_association_is_left_out() {
        let out = rules().convert(device_and_association()).unwrap();
        let types: Vec<&str> = out.iter().map(|r| r.resource_type.as_str()).collect();
        assert_eq!(types, ["Device", "Observation"]);
        assert_eq!(out[0].json["patient"], json!({ "reference": "Patient/7" }));
        assert_eq!(out[0].id, "d1", "ids stay as mapped");
    }

    #[test]
    fn test_device_name_becomes_device_name_with_name_and_display_name_is_dropped() {
        let out = rules().convert(device_and_association()).unwrap();
        let device = &out[0].json;
        assert_eq!(
            device["deviceName"],
            json!([{ "name": "BPM Connect", "type": "user-friendly-name" }])
        );
        assert!(device.get("name").is_none());
        assert!(device.get("displayName").is_none());
        assert_eq!(device["modelNumber"], "BPM Connect", "shared elements stay");
    }

    #[test]
    fn test_a_device_without_its_association_gets_no_patient() {
        let mut resources = device_and_association();
        resources.remove(1);
        let out = rules().convert(resources).unwrap();
        assert!(out[0].json.get("patient").is_none());
    }

    #[test]
    fn test_an_association_of_another_device_links_nothing() {
        let mut resources = device_and_association();
        resources[1].json["device"]["reference"] = json!("Device/other");
        let out = rules().convert(resources).unwrap();
        assert!(out[0].json.get("patient").is_none());
    }

    #[test]
    fn test_observations_without_r5_only_elements_are_unchanged() {
        let resources = device_and_association();
        let out = rules().convert(resources.clone()).unwrap();
        assert_eq!(out[1], resources[2]);
    }

    fn sampled(data: Value) -> Vec<MappedResource> {
        vec![resource(json!({
            "resourceType": "Observation", "id": "o1", "status": "final",
            "code": { "coding": [{ "system": "http://loinc.org", "code": "131328" }] },
            "valueSampledData": data.clone(),
            "component": [{ "code": { "text": "lead I" }, "valueSampledData": data }],
        }))]
    }

    #[test]
    fn test_sampled_data_interval_becomes_the_period_in_milliseconds() {
        for (interval, unit, period) in [
            (json!(2), "ms", 2.0),
            (json!(0.5), "s", 500.0),
            (json!(1), "min", 60_000.0),
        ] {
            let out = rules()
                .convert(sampled(json!({
                    "origin": { "value": 0 }, "interval": interval, "intervalUnit": unit,
                    "dimensions": 1, "data": "1 2 3",
                })))
                .unwrap();
            let obs = &out[0].json;
            for data in [
                &obs["valueSampledData"],
                &obs["component"][0]["valueSampledData"],
            ] {
                assert_eq!(data["period"].as_f64(), Some(period), "{unit}");
                assert!(data.get("interval").is_none() && data.get("intervalUnit").is_none());
                assert_eq!(data["data"], "1 2 3");
            }
        }
    }

    #[test]
    fn test_sampled_data_offsets_and_code_map_become_cross_version_extensions() {
        let out = rules()
            .convert(sampled(json!({
                "origin": { "value": 0 }, "interval": 30, "intervalUnit": "s",
                "offsets": "0 30 90", "codeMap": "http://example.org/ConceptMap/stages",
                "dimensions": 1, "data": "1 2 3",
            })))
            .unwrap();
        let data = &out[0].json["component"][0]["valueSampledData"];
        assert_eq!(
            data["extension"],
            json!([
                { "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-SampledData.offsets", "valueString": "0 30 90" },
                { "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-SampledData.codeMap", "valueCanonical": "http://example.org/ConceptMap/stages" },
            ])
        );
        assert!(data.get("offsets").is_none() && data.get("codeMap").is_none());
    }

    #[test]
    fn test_an_interval_without_a_time_unit_is_an_error_naming_the_element() {
        for (unit, found) in [(json!("mm[Hg]"), Some("mm[Hg]")), (Value::Null, None)] {
            let mut data = json!({ "origin": { "value": 0 }, "interval": 2, "dimensions": 1 });
            if !unit.is_null() {
                data["intervalUnit"] = unit.clone();
            }
            let e = rules().convert(sampled(data)).unwrap_err();
            assert_eq!(
                e,
                ConversionError::TimeUnit {
                    path: "Observation.component.valueSampledData.interval".into(),
                    unit: found.map(str::to_owned),
                },
                "the components' rule comes first (deepest first)"
            );
        }
    }

    #[test]
    fn test_rules_that_are_ambiguous_or_malformed_do_not_load() {
        for (text, expected) in [
            ("format = 2", "format 2"),
            (
                "format = 1\n[[elements]]\npaths = [\"Device.name\"]\nrename = \"a\"\ndrop = true",
                "exactly one",
            ),
            (
                "format = 1\n[[elements]]\npaths = [\"Device\"]\ndrop = true",
                "not <Type>.<element>",
            ),
            (
                "format = 1\n[[elements]]\npaths = [\"Device.x\"]\nextension = \"http://e\"",
                "value<Type>",
            ),
            (
                "format = 1\n[[elements]]\npaths = [\"Device.x\"]\nmilliseconds = \"u\"",
                "needs `to`",
            ),
            (
                "format = 1\n[[elements]]\npaths = [\"Device.x\"]\ndrop = true\nto = \"y\"",
                "`to` for milliseconds",
            ),
            (
                "format = 1\n[[links]]\nfrom = \"A.b\"\nvia = \"C.d\"\nto = \"E.f\"",
                "different resource types",
            ),
            (
                "format = 1\n[[links]]\nfrom = \"A.b.c\"\nvia = \"A.d\"\nto = \"E.f\"",
                "not <Type>.<element>",
            ),
        ] {
            let e = R4Rules::from_toml_str(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
        assert!(matches!(
            R4Rules::from_toml_str("format = 1\nunknown = 1"),
            Err(RulesError::Parse(_))
        ));
    }
}
