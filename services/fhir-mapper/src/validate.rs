//! Validation of mapped resources before they leave the mapper.
//!
//! Two layers, for the FHIR version the target speaks ([`FhirVersion`]):
//! * [`FhirValidator::validate`]: the official FHIR JSON schema, compiled once per resource
//!   type: R5 `schemas/fhir/fhir.schema.json` (draft-06, from npm `hl7.fhir.r5.core@5.0.0`), R4
//!   `schemas/fhir/fhir-r4.schema.json` (4.0.1, see `scripts/r4-schema.py`). It catches unknown
//!   elements, wrong JSON types, primitive patterns, choice-type names and elements of the other
//!   version, but not cardinalities of primitives, code bindings, invariants or profiles.
//! * [`check_profile_rules`]: the rules the schema cannot express that ohx relies on: required
//!   status bindings, the core vital-signs profiles (category, subject, `effective[x]`, vs-1,
//!   vs-2, vs-3, fixed LOINC codes and UCUM units; the same in R4 and R5), obs-6, obs-7, and
//!   the required bindings of Device (each version's) and DeviceAssociation (R5 only).
//!
//! [`FhirValidator::validate_all`] runs both. Error reasons carry element paths and the
//! validator's messages with instance values masked, so they can be logged (no health data).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::mapping::{
    DEVICE_ASSOCIATION_STATUS_SYSTEM, DEVICE_ASSOCIATION_STATUSES, DEVICE_NAME_TYPES,
    DEVICE_STATUSES,
};
use crate::shapes::Shapes;

/// The official FHIR R5 JSON schema (draft-06, `hl7.fhir.r5.core@5.0.0`, CC0).
pub const FHIR_SCHEMA_JSON: &str = include_str!("../../../schemas/fhir/fhir.schema.json");

/// The official FHIR R4 (4.0.1) JSON schema (draft-06, CC0; `scripts/r4-schema.py`).
pub const FHIR_R4_SCHEMA_JSON: &str = include_str!("../../../schemas/fhir/fhir-r4.schema.json");

/// Resource types [`FhirValidator`] compiles a schema for (R5).
pub const VALIDATED_RESOURCE_TYPES: [&str; 5] = [
    "Observation",
    "Device",
    "DeviceAssociation",
    "DiagnosticReport",
    "Bundle",
];

/// Resource types [`FhirValidator`] compiles a schema for (R4, which has no DeviceAssociation).
pub const VALIDATED_R4_RESOURCE_TYPES: [&str; 4] =
    ["Observation", "Device", "DiagnosticReport", "Bundle"];

/// The FHIR version a target speaks, and so what the mapper writes and validates for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FhirVersion {
    /// FHIR R4 (4.0.1).
    R4,
    /// FHIR R5 (5.0.0).
    R5,
}

impl FhirVersion {
    /// The version a record's context names ([`ohx_common::records::FHIR_R4`], `FHIR_R5`).
    pub fn from_context(version: &str) -> Option<Self> {
        match version {
            ohx_common::records::FHIR_R4 => Some(Self::R4),
            ohx_common::records::FHIR_R5 => Some(Self::R5),
            _ => None,
        }
    }

    /// `R4` or `R5`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::R4 => ohx_common::records::FHIR_R4,
            Self::R5 => ohx_common::records::FHIR_R5,
        }
    }

    fn schema_json(self) -> &'static str {
        match self {
            Self::R4 => FHIR_R4_SCHEMA_JSON,
            Self::R5 => FHIR_SCHEMA_JSON,
        }
    }

    fn resource_types(self) -> &'static [&'static str] {
        match self {
            Self::R4 => &VALIDATED_R4_RESOURCE_TYPES,
            Self::R5 => &VALIDATED_RESOURCE_TYPES,
        }
    }
}

impl fmt::Display for FhirVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Codes of R4 `Device.status` (required binding `FHIRDeviceStatus`, 4.0.1).
pub const R4_DEVICE_STATUSES: [&str; 4] = ["active", "inactive", "entered-in-error", "unknown"];

/// Codes of R4 `Device.deviceName.type` (required binding `DeviceNameType`, 4.0.1).
pub const R4_DEVICE_NAME_TYPES: [&str; 6] = [
    "udi-label-name",
    "user-friendly-name",
    "patient-reported-name",
    "manufacturer-name",
    "model-name",
    "other",
];

/// How many issues a [`ValidationError`] keeps (it counts all of them).
pub const MAX_REPORTED_ISSUES: usize = 5;

/// Codes of R5 `Observation.status` (required binding `ObservationStatus`).
pub const OBSERVATION_STATUSES: [&str; 8] = [
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
];

/// Codes of `DiagnosticReport.status` (required binding `DiagnosticReportStatus`; R4 lacks
/// `modified`, which ohx never writes).
pub const DIAGNOSTIC_REPORT_STATUSES: [&str; 10] = [
    "registered",
    "partial",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "appended",
    "cancelled",
    "entered-in-error",
    "unknown",
];

/// Canonical URL prefix of the R5 core vital-signs profiles.
pub const CORE_PROFILE_BASE: &str = "http://hl7.org/fhir/StructureDefinition/";

/// System of `Observation.category`.
pub const OBSERVATION_CATEGORY_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/observation-category";

const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";

/// Fixed codes and units of one R5 core vital-signs profile.
struct VitalSignsProfile {
    /// Profile name after [`CORE_PROFILE_BASE`].
    name: &'static str,
    /// LOINC code fixed on `Observation.code` (empty: none, the generic profile).
    loinc: &'static str,
    /// UCUM codes allowed in `Observation.valueQuantity` (empty: not constrained here).
    value_units: &'static [&'static str],
    /// Required components: LOINC code and allowed UCUM codes.
    components: &'static [(&'static str, &'static [&'static str])],
}

/// The core vital-signs profiles (R5 `StructureDefinition-*.json`, research/fhir.md §1.2).
const VITAL_SIGNS_PROFILES: &[VitalSignsProfile] = &[
    VitalSignsProfile {
        name: "vitalsigns",
        loinc: "",
        value_units: &[],
        components: &[],
    },
    VitalSignsProfile {
        name: "vitalspanel",
        loinc: "85353-1",
        value_units: &[],
        components: &[],
    },
    VitalSignsProfile {
        name: "heartrate",
        loinc: "8867-4",
        value_units: &["/min"],
        components: &[],
    },
    VitalSignsProfile {
        name: "resprate",
        loinc: "9279-1",
        value_units: &["/min"],
        components: &[],
    },
    VitalSignsProfile {
        name: "bp",
        loinc: "85354-9",
        value_units: &[],
        components: &[("8480-6", &["mm[Hg]"]), ("8462-4", &["mm[Hg]"])],
    },
    VitalSignsProfile {
        name: "bodyweight",
        loinc: "29463-7",
        value_units: &["kg", "[lb_av]", "g"],
        components: &[],
    },
    VitalSignsProfile {
        name: "bodyheight",
        loinc: "8302-2",
        value_units: &["cm", "[in_i]"],
        components: &[],
    },
    VitalSignsProfile {
        name: "bmi",
        loinc: "39156-5",
        value_units: &["kg/m2"],
        components: &[],
    },
    VitalSignsProfile {
        name: "bodytemp",
        loinc: "8310-5",
        value_units: &["Cel", "[degF]"],
        components: &[],
    },
    VitalSignsProfile {
        name: "oxygensat",
        loinc: "2708-6",
        value_units: &["%"],
        components: &[],
    },
];

/// Why the validator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The embedded schema is not JSON.
    #[error("the FHIR JSON schema is not valid JSON: {0}")]
    Parse(#[from] serde_json::Error),
    /// The embedded schema lacks what the validator needs.
    #[error("the FHIR JSON schema has an unexpected shape: {0}")]
    Shape(String),
    /// jsonschema could not compile the schema of a resource type.
    #[error("cannot compile the FHIR JSON schema of {resource_type}: {message}")]
    Compile {
        /// The resource type.
        resource_type: &'static str,
        /// The compiler's message.
        message: String,
    },
}

/// Which layer rejected a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationKind {
    /// The FHIR JSON schema of the target's version.
    Schema,
    /// ohx's profile and binding rules ([`check_profile_rules`]).
    Profile,
}

impl fmt::Display for ValidationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Schema => "the FHIR JSON schema",
            Self::Profile => "the FHIR profile rules",
        })
    }
}

/// One problem found in a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// JSON pointer of the offending element (`""` = the resource).
    pub path: String,
    /// What is wrong (instance values masked).
    pub message: String,
}

/// A resource that is not valid FHIR (or breaks a profile rule), with a readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Which layer rejected it.
    pub kind: ValidationKind,
    /// The resource's `resourceType` (`?` if absent).
    pub resource_type: String,
    /// The first [`MAX_REPORTED_ISSUES`] issues.
    pub issues: Vec<Issue>,
    /// The number of issues found.
    pub issue_count: usize,
}

impl ValidationError {
    /// The issues as one line: `/status: ...; /component/0: ... (and 3 more)`.
    pub fn reason(&self) -> String {
        let mut reason = self
            .issues
            .iter()
            .map(|issue| {
                let path = if issue.path.is_empty() {
                    "/"
                } else {
                    &issue.path
                };
                format!("{path}: {}", issue.message)
            })
            .collect::<Vec<_>>()
            .join("; ");
        let more = self.issue_count.saturating_sub(self.issues.len());
        if more > 0 {
            reason.push_str(&format!(" (and {more} more)"));
        }
        reason
    }

    fn from_issues(kind: ValidationKind, resource_type: &str, issues: Vec<Issue>) -> Self {
        let issue_count = issues.len();
        let mut issues = issues;
        issues.truncate(MAX_REPORTED_ISSUES);
        Self {
            kind,
            resource_type: resource_type.to_owned(),
            issues,
            issue_count,
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not valid against {}: {}",
            self.resource_type,
            self.kind,
            self.reason()
        )
    }
}

impl std::error::Error for ValidationError {}

/// Validators of one FHIR version's JSON schema, compiled once per resource type of
/// [`VALIDATED_RESOURCE_TYPES`] (R4: [`VALIDATED_R4_RESOURCE_TYPES`]). Building one takes
/// seconds (see [`FhirValidator::compile_time`]); build it once at start-up and share it.
pub struct FhirValidator {
    version: FhirVersion,
    validators: BTreeMap<&'static str, jsonschema::Validator>,
    shapes: Shapes,
    compile_time: Duration,
}

impl fmt::Debug for FhirValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FhirValidator")
            .field("version", &self.version)
            .field(
                "resource_types",
                &self.validators.keys().collect::<Vec<_>>(),
            )
            .field("shapes", &self.shapes)
            .field("compile_time", &self.compile_time)
            .finish()
    }
}

impl FhirValidator {
    /// Compiles the embedded schema of `version`: for each resource type, the root schema with
    /// its `definitions` and, instead of the top-level `oneOf`/`discriminator` over all
    /// resources, a `$ref` to `#/definitions/<Type>` (better messages, less work).
    pub fn new(version: FhirVersion) -> Result<Self, SchemaError> {
        let started = Instant::now();
        let root: Value = serde_json::from_str(version.schema_json())?;
        let Value::Object(mut root) = root else {
            return Err(SchemaError::Shape("the root is not an object".to_owned()));
        };
        root.remove("oneOf");
        root.remove("discriminator");
        for definition in root.values_mut() {
            fix_ecma_only_patterns(definition);
        }
        let definitions = root
            .get("definitions")
            .and_then(Value::as_object)
            .ok_or_else(|| SchemaError::Shape("no `definitions`".to_owned()))?;
        for &resource_type in version.resource_types() {
            if !definitions.contains_key(resource_type) {
                return Err(SchemaError::Shape(format!(
                    "no definition of {resource_type}"
                )));
            }
        }
        let shapes = Shapes::new(definitions);
        let mut validators = BTreeMap::new();
        for &resource_type in version.resource_types() {
            let mut schema: Map<String, Value> = root.clone();
            schema.insert(
                "$ref".to_owned(),
                Value::String(format!("#/definitions/{resource_type}")),
            );
            let validator = jsonschema::draft6::options()
                .build(&Value::Object(schema))
                .map_err(|error| SchemaError::Compile {
                    resource_type,
                    message: error.to_string(),
                })?;
            validators.insert(resource_type, validator);
        }
        Ok(Self {
            version,
            validators,
            shapes,
            compile_time: started.elapsed(),
        })
    }

    /// The FHIR version this validator checks.
    pub fn version(&self) -> FhirVersion {
        self.version
    }

    /// The shapes accepted so far (see [`Shapes`]).
    pub fn shapes(&self) -> &Shapes {
        &self.shapes
    }

    /// How long [`FhirValidator::new`] took (parse + compile of all types).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Validates a resource against the FHIR JSON schema of its `resourceType` (one of the
    /// version's validated types). Resources inside a Bundle's entries are validated
    /// against their own type first, so their issues are specific.
    ///
    /// A resource of a shape already accepted has only its leaves checked ([`Shapes`]).
    pub fn validate(&self, resource: &Value) -> Result<(), ValidationError> {
        if self.shapes.accepts(resource) {
            return Ok(());
        }
        let resource_type = resource_type_of(resource);
        let mut issues = Vec::new();
        self.collect_schema_issues(resource, "", &mut issues);
        if issues.is_empty() {
            self.shapes.learn(resource_type, resource);
            Ok(())
        } else {
            Err(ValidationError::from_issues(
                ValidationKind::Schema,
                resource_type,
                issues,
            ))
        }
    }

    /// [`FhirValidator::validate`], then [`check_profile_rules`].
    pub fn validate_all(&self, resource: &Value) -> Result<(), ValidationError> {
        self.validate(resource)?;
        check_profile_rules(resource, self.version)
    }

    /// Whether the full schema accepts `resource` (no shapes): the oracle of the shape tests.
    #[cfg(test)]
    pub(crate) fn schema_accepts(&self, resource: &Value) -> bool {
        let mut issues = Vec::new();
        self.collect_schema_issues(resource, "", &mut issues);
        issues.is_empty()
    }

    fn collect_schema_issues(&self, resource: &Value, prefix: &str, issues: &mut Vec<Issue>) {
        let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
            issues.push(Issue {
                path: format!("{prefix}/resourceType"),
                message: "missing or not a string".to_owned(),
            });
            return;
        };
        let Some(validator) = self.validators.get(resource_type) else {
            issues.push(Issue {
                path: format!("{prefix}/resourceType"),
                message: format!("no validator for resource type `{resource_type}`"),
            });
            return;
        };
        if resource_type == "Bundle" {
            // Entries of known types first: the bundle's own check would only report a broken
            // entry as "not valid under any of the schemas listed in the 'oneOf' keyword".
            let entries = resource.get("entry").and_then(Value::as_array);
            for (i, entry) in entries.into_iter().flatten().enumerate() {
                if let Some(inner) = entry.get("resource")
                    && inner
                        .get("resourceType")
                        .and_then(Value::as_str)
                        .is_some_and(|t| self.validators.contains_key(t))
                {
                    let path = format!("{prefix}/entry/{i}/resource");
                    self.collect_schema_issues(inner, &path, issues);
                }
            }
            if !issues.is_empty() {
                return;
            }
        }
        for error in validator.iter_errors(resource) {
            issues.push(Issue {
                path: format!("{prefix}{}", error.instance_path()),
                message: error.masked().to_string(),
            });
        }
    }
}

/// The `decimal` pattern of the R5 schema (25 places) has a stray `}` (`{1,9}})`): a literal in
/// ECMA-262 regexes, a syntax error for Rust's regex engines. Escaping it keeps the ECMA meaning.
/// (The pattern never applies anyway: FHIR decimals are JSON numbers and `pattern` only checks
/// strings.)
const ECMA_DECIMAL_PATTERN: &str =
    r"^-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,9}})?$";
const RUST_DECIMAL_PATTERN: &str =
    r"^-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,9}\})?$";

fn fix_ecma_only_patterns(schema: &mut Value) {
    match schema {
        Value::Object(object) => {
            for (key, value) in object.iter_mut() {
                if key == "pattern" && value.as_str() == Some(ECMA_DECIMAL_PATTERN) {
                    *value = Value::String(RUST_DECIMAL_PATTERN.to_owned());
                } else {
                    fix_ecma_only_patterns(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(fix_ecma_only_patterns),
        _ => {}
    }
}

/// Checks the rules of FHIR (`version`) that the JSON schema cannot express, for the resources
/// ohx writes:
/// * Observation: `status` present and a code of `ObservationStatus`; obs-6 (no
///   `dataAbsentReason` with a value), obs-7 (no value when a component repeats
///   `Observation.code`).
/// * Observations claiming a core vital-signs profile in `meta.profile`, having category
///   `vital-signs`, or carrying a vital-sign LOINC code: category `vital-signs`, subject a
///   Patient, `effectiveDateTime` (to the day, vs-1) or `effectivePeriod`, vs-2 (value,
///   components, members or dataAbsentReason), vs-3 (every component has a value or
///   dataAbsentReason), every `valueQuantity` with value, unit, UCUM system and code, and each
///   specific profile's fixed LOINC code, required components and UCUM units.
/// * Device: `status` and `name.type` (R4: `deviceName.type`) codes of their required
///   bindings, `name.value` (R4: `deviceName.name`) present.
/// * DeviceAssociation (R5): `status` coded from `deviceassociation-status`, `device.reference`.
/// * R4 SampledData: `period` present (1..1 in R4).
pub fn check_profile_rules(resource: &Value, version: FhirVersion) -> Result<(), ValidationError> {
    let resource_type = resource_type_of(resource);
    let mut issues = Vec::new();
    if let Some(object) = resource.as_object() {
        match (resource_type, version) {
            ("Observation", _) => check_observation(object, version, &mut issues),
            ("Device", FhirVersion::R5) => check_device(object, &R5_DEVICE, &mut issues),
            ("Device", FhirVersion::R4) => check_device(object, &R4_DEVICE, &mut issues),
            ("DeviceAssociation", FhirVersion::R5) => {
                check_device_association(object, &mut issues);
            }
            ("DiagnosticReport", _) => check_diagnostic_report(object, &mut issues),
            _ => {}
        }
    } else {
        issue(&mut issues, "", "the resource is not a JSON object");
    }
    if issues.is_empty() {
        Ok(())
    } else {
        Err(ValidationError::from_issues(
            ValidationKind::Profile,
            resource_type,
            issues,
        ))
    }
}

fn resource_type_of(resource: &Value) -> &str {
    resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("?")
}

fn issue(issues: &mut Vec<Issue>, path: &str, message: &str) {
    issues.push(Issue {
        path: path.to_owned(),
        message: message.to_owned(),
    });
}

fn check_observation(obs: &Map<String, Value>, version: FhirVersion, issues: &mut Vec<Issue>) {
    if version == FhirVersion::R4 {
        check_r4_sampled_data(obs, issues);
    }
    match obs.get("status").and_then(Value::as_str) {
        None => issue(issues, "/status", "status is required"),
        Some(status) if !OBSERVATION_STATUSES.contains(&status) => issue(
            issues,
            "/status",
            "not a code of http://hl7.org/fhir/ValueSet/observation-status",
        ),
        Some(_) => {}
    }
    let components = obs
        .get("component")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let own_value = value_key(obs).is_some();
    if own_value && obs.contains_key("dataAbsentReason") {
        issue(issues, "", "obs-6: dataAbsentReason together with a value");
    }
    let own_codes = coding_keys(obs.get("code"));
    for (i, component) in components.iter().enumerate() {
        let Some(component) = component.as_object() else {
            continue;
        };
        if value_key(component).is_some() && component.contains_key("dataAbsentReason") {
            issue(
                issues,
                &format!("/component/{i}"),
                "obs-6: dataAbsentReason together with a value",
            );
        }
        let codes = coding_keys(component.get("code"));
        if own_value && codes.iter().any(|c| own_codes.contains(c)) {
            issue(
                issues,
                &format!("/component/{i}/code"),
                "obs-7: a component repeats Observation.code, so Observation.value is not allowed",
            );
        }
    }

    let claimed = claimed_profiles(obs);
    let applicable: Vec<&VitalSignsProfile> = VITAL_SIGNS_PROFILES
        .iter()
        .filter(|p| {
            claimed.contains(&p.name)
                || (!p.loinc.is_empty() && has_loinc(obs.get("code"), p.loinc))
        })
        .collect();
    if applicable.is_empty() && !has_vital_signs_category(obs) {
        return;
    }
    check_vital_signs(obs, components, issues);
    for profile in applicable {
        check_specific_profile(obs, components, profile, issues);
    }
}

/// Rules of the generic `vitalsigns` profile.
fn check_vital_signs(obs: &Map<String, Value>, components: &[Value], issues: &mut Vec<Issue>) {
    if !has_vital_signs_category(obs) {
        issue(
            issues,
            "/category",
            "vital signs need a category coding observation-category#vital-signs",
        );
    }
    let subject = obs
        .get("subject")
        .and_then(|s| s.get("reference"))
        .and_then(Value::as_str);
    if !subject.is_some_and(|r| r.starts_with("Patient/") || r.contains("/Patient/")) {
        issue(
            issues,
            "/subject",
            "vital signs need a subject referencing a Patient",
        );
    }
    match (obs.get("effectiveDateTime"), obs.get("effectivePeriod")) {
        (Some(Value::String(date_time)), None) => {
            if !precise_to_day(date_time) {
                issue(
                    issues,
                    "/effectiveDateTime",
                    "vs-1: effectiveDateTime must be precise to the day",
                );
            }
        }
        (None, Some(Value::Object(_))) => {}
        _ => issue(
            issues,
            "",
            "vital signs need effectiveDateTime or effectivePeriod",
        ),
    }
    let has_member = obs
        .get("hasMember")
        .and_then(Value::as_array)
        .is_some_and(|m| !m.is_empty());
    if components.is_empty()
        && !has_member
        && value_key(obs).is_none()
        && !obs.contains_key("dataAbsentReason")
    {
        issue(
            issues,
            "",
            "vs-2: needs a value, components, hasMember or dataAbsentReason",
        );
    }
    if let Some(quantity) = obs.get("valueQuantity") {
        check_quantity(quantity, || "/valueQuantity".to_owned(), issues);
    }
    for (i, component) in components.iter().enumerate() {
        if value_key_of(component).is_none() && component.get("dataAbsentReason").is_none() {
            issue(
                issues,
                &format!("/component/{i}"),
                "vs-3: a component needs a value or dataAbsentReason",
            );
        }
        if let Some(quantity) = component.get("valueQuantity") {
            check_quantity(quantity, || format!("/component/{i}/valueQuantity"), issues);
        }
    }
}

/// A vital-signs Quantity: value, unit, UCUM system and code all present. `path` is made only
/// for an issue.
fn check_quantity(quantity: &Value, path: impl Fn() -> String, issues: &mut Vec<Issue>) {
    if !quantity.get("value").is_some_and(Value::is_number) {
        issue(issues, &path(), "a vital-signs quantity needs a value");
    }
    if !quantity.get("unit").is_some_and(Value::is_string) {
        issue(issues, &path(), "a vital-signs quantity needs a unit");
    }
    if quantity.get("system").and_then(Value::as_str) != Some(UCUM) {
        issue(
            issues,
            &path(),
            "a vital-signs quantity needs system http://unitsofmeasure.org",
        );
    }
    if !quantity.get("code").is_some_and(Value::is_string) {
        issue(issues, &path(), "a vital-signs quantity needs a UCUM code");
    }
}

/// Fixed code, units and required components of one specific vital-signs profile.
fn check_specific_profile(
    obs: &Map<String, Value>,
    components: &[Value],
    profile: &VitalSignsProfile,
    issues: &mut Vec<Issue>,
) {
    let name = profile.name;
    if !profile.loinc.is_empty() && !has_loinc(obs.get("code"), profile.loinc) {
        issue(
            issues,
            "/code",
            &format!("profile {name} requires LOINC {}", profile.loinc),
        );
    }
    if !profile.value_units.is_empty()
        && let Some(quantity) = obs.get("valueQuantity")
        && !quantity_code_in(quantity, profile.value_units)
    {
        issue(
            issues,
            "/valueQuantity/code",
            &format!("profile {name} requires UCUM {:?}", profile.value_units),
        );
    }
    for (loinc, units) in profile.components {
        let found: Vec<(usize, &Value)> = components
            .iter()
            .enumerate()
            .filter(|(_, c)| has_loinc(c.get("code"), loinc))
            .collect();
        if found.is_empty() {
            issue(
                issues,
                "/component",
                &format!("profile {name} requires a component with LOINC {loinc}"),
            );
        }
        for (i, component) in found {
            if let Some(quantity) = component.get("valueQuantity")
                && !quantity_code_in(quantity, units)
            {
                issue(
                    issues,
                    &format!("/component/{i}/valueQuantity/code"),
                    &format!("profile {name} requires UCUM {units:?} for LOINC {loinc}"),
                );
            }
        }
    }
}

/// Where a version keeps a Device's names and which codes its bindings allow.
struct DeviceRules {
    statuses: &'static [&'static str],
    names: &'static str,
    name_value: &'static str,
    name_types: &'static [&'static str],
}

const R5_DEVICE: DeviceRules = DeviceRules {
    statuses: &DEVICE_STATUSES,
    names: "name",
    name_value: "value",
    name_types: &DEVICE_NAME_TYPES,
};

const R4_DEVICE: DeviceRules = DeviceRules {
    statuses: &R4_DEVICE_STATUSES,
    names: "deviceName",
    name_value: "name",
    name_types: &R4_DEVICE_NAME_TYPES,
};

fn check_device(device: &Map<String, Value>, rules: &DeviceRules, issues: &mut Vec<Issue>) {
    if let Some(status) = device.get("status")
        && !status.as_str().is_some_and(|s| rules.statuses.contains(&s))
    {
        issue(issues, "/status", "not a code of FHIRDeviceStatus");
    }
    let names = device
        .get(rules.names)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let (list, value) = (rules.names, rules.name_value);
    for (i, name) in names.iter().enumerate() {
        if !name.get(value).is_some_and(Value::is_string) {
            issue(
                issues,
                &format!("/{list}/{i}/{value}"),
                &format!("Device.{list}.{value} is required"),
            );
        }
        if !name
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| rules.name_types.contains(&t))
        {
            issue(
                issues,
                &format!("/{list}/{i}/type"),
                &format!("Device.{list}.type must be a code of DeviceNameType"),
            );
        }
    }
}

/// R4 `SampledData.period` is 1..1 (R5's `interval` is optional): every SampledData of the
/// Observation and its components has one.
fn check_r4_sampled_data(obs: &Map<String, Value>, issues: &mut Vec<Issue>) {
    let components = obs
        .get("component")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let own = obs.get("valueSampledData").map(|d| (String::new(), d));
    let of_components = components.iter().enumerate().filter_map(|(i, c)| {
        c.get("valueSampledData")
            .map(|d| (format!("/component/{i}"), d))
    });
    for (at, data) in own.into_iter().chain(of_components) {
        if !data.get("period").is_some_and(Value::is_number) {
            issue(
                issues,
                &format!("{at}/valueSampledData/period"),
                "R4 SampledData needs a period (milliseconds between samples)",
            );
        }
    }
}

fn check_device_association(association: &Map<String, Value>, issues: &mut Vec<Issue>) {
    let coded = association
        .get("status")
        .and_then(|s| s.get("coding"))
        .and_then(Value::as_array)
        .is_some_and(|codings| {
            codings.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(DEVICE_ASSOCIATION_STATUS_SYSTEM)
                    && c.get("code")
                        .and_then(Value::as_str)
                        .is_some_and(|code| DEVICE_ASSOCIATION_STATUSES.contains(&code))
            })
        });
    if !coded {
        issue(
            issues,
            "/status",
            "status needs a coding of http://hl7.org/fhir/deviceassociation-status",
        );
    }
    if !association
        .get("device")
        .and_then(|d| d.get("reference"))
        .is_some_and(Value::is_string)
    {
        issue(issues, "/device", "device.reference is required");
    }
}

/// DiagnosticReport: a status of its required binding, a code and a subject (what the EHR
/// files the report under).
fn check_diagnostic_report(report: &Map<String, Value>, issues: &mut Vec<Issue>) {
    match report.get("status").and_then(Value::as_str) {
        None => issue(issues, "/status", "status is required"),
        Some(status) if !DIAGNOSTIC_REPORT_STATUSES.contains(&status) => issue(
            issues,
            "/status",
            "not a code of http://hl7.org/fhir/ValueSet/diagnostic-report-status",
        ),
        Some(_) => {}
    }
    if !report.contains_key("code") {
        issue(issues, "/code", "code is required");
    }
    if !report
        .get("subject")
        .and_then(|s| s.get("reference"))
        .is_some_and(Value::is_string)
    {
        issue(issues, "/subject", "subject.reference is required");
    }
}

/// The `value[x]` key of an object, if any (`valueQuantity`, `valueInteger`, ...).
fn value_key(object: &Map<String, Value>) -> Option<&str> {
    object.keys().map(String::as_str).find(|k| {
        k.strip_prefix("value")
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
    })
}

fn value_key_of(value: &Value) -> Option<&str> {
    value.as_object().and_then(value_key)
}

/// `(system, code)` of every coding of a CodeableConcept.
fn coding_keys(concept: Option<&Value>) -> Vec<(&str, &str)> {
    concept
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|coding| {
            let system = coding.get("system").and_then(Value::as_str)?;
            let code = coding.get("code").and_then(Value::as_str)?;
            Some((system, code))
        })
        .collect()
}

fn has_coding(concept: Option<&Value>, system: &str, code: &str) -> bool {
    concept
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .is_some_and(|codings| {
            codings.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(system)
                    && c.get("code").and_then(Value::as_str) == Some(code)
            })
        })
}

fn has_loinc(concept: Option<&Value>, code: &str) -> bool {
    has_coding(concept, LOINC, code)
}

fn has_vital_signs_category(obs: &Map<String, Value>) -> bool {
    obs.get("category")
        .and_then(Value::as_array)
        .is_some_and(|categories| {
            categories
                .iter()
                .any(|c| has_coding(Some(c), OBSERVATION_CATEGORY_SYSTEM, "vital-signs"))
        })
}

/// Names of the core profiles (after [`CORE_PROFILE_BASE`]) in `meta.profile`; a version
/// suffix (`|5.0.0`) is ignored.
fn claimed_profiles(obs: &Map<String, Value>) -> Vec<&str> {
    obs.get("meta")
        .and_then(|m| m.get("profile"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(|url| url.split('|').next()?.strip_prefix(CORE_PROFILE_BASE))
        .collect()
}

fn quantity_code_in(quantity: &Value, units: &[&str]) -> bool {
    quantity.get("system").and_then(Value::as_str) == Some(UCUM)
        && quantity
            .get("code")
            .and_then(Value::as_str)
            .is_some_and(|code| units.contains(&code))
}

/// vs-1: `YYYY-MM-DD` at least.
fn precise_to_day(date_time: &str) -> bool {
    let bytes = date_time.as_bytes();
    bytes.len() >= 10
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4] == b'-'
        && bytes[5..7].iter().all(u8::is_ascii_digit)
        && bytes[7] == b'-'
        && bytes[8..10].iter().all(u8::is_ascii_digit)
}

/// One validator shared by the tests of this crate (compiling it takes seconds).
#[cfg(test)]
pub(crate) fn shared_test_validator() -> &'static FhirValidator {
    static VALIDATOR: std::sync::OnceLock<FhirValidator> = std::sync::OnceLock::new();
    VALIDATOR.get_or_init(|| match FhirValidator::new(FhirVersion::R5) {
        Ok(validator) => validator,
        Err(error) => panic!("the FHIR validator does not compile: {error}"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn validator() -> &'static FhirValidator {
        shared_test_validator()
    }

    /// research/examples/bp.json (validated there against the R5 schema and fhir.resources).
    fn bp_example() -> Value {
        json!({
          "resourceType": "Observation",
          "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/bp"]},
          "identifier": [{"system": "https://wearbridge.example.org/fhir/sid/observation",
                          "value": "withings-u12345-grp-987654322-meastype-10"}],
          "status": "final",
          "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "vital-signs"}]}],
          "code": {"coding": [
            {"system": "http://loinc.org", "code": "85354-9",
             "display": "Blood pressure panel with all children optional"},
            {"system": "urn:iso:std:iso:11073:10101", "code": "150020", "display": "MDC_PRESS_BLD_NONINV"}]},
          "subject": {"reference": "Patient/example"},
          "effectiveDateTime": "2025-06-01T07:31:12+02:00",
          "device": {"reference": "Device/withings-bpm-connect-7"},
          "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"},
                                 {"system": "urn:iso:std:iso:11073:10101", "code": "150021", "display": "MDC_PRESS_BLD_NONINV_SYS"}]},
             "valueQuantity": {"value": 121, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"},
                                 {"system": "urn:iso:std:iso:11073:10101", "code": "150022", "display": "MDC_PRESS_BLD_NONINV_DIA"}]},
             "valueQuantity": {"value": 78, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
          ]
        })
    }

    fn heart_rate_spot() -> Value {
        json!({
          "resourceType": "Observation",
          "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/heartrate"]},
          "status": "final",
          "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "vital-signs"}]}],
          "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
          "subject": {"reference": "Patient/example"},
          "effectiveDateTime": "2025-06-01T07:31:12+02:00",
          "valueQuantity": {"value": 64, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}
        })
    }

    fn schema_error(resource: &Value) -> ValidationError {
        let error = validator().validate(resource).unwrap_err();
        assert_eq!(error.kind, ValidationKind::Schema);
        error
    }

    fn profile_error(resource: &Value) -> ValidationError {
        validator().validate(resource).unwrap();
        let error = check_profile_rules(resource, FhirVersion::R5).unwrap_err();
        assert_eq!(error.kind, ValidationKind::Profile);
        error
    }

    #[test]
    fn test_validator_compiles_all_types_and_reports_compile_time() {
        let validator = validator();
        for resource_type in VALIDATED_RESOURCE_TYPES {
            assert!(
                validator.validators.contains_key(resource_type),
                "{resource_type}"
            );
        }
        eprintln!("FhirValidator::new() took {:?}", validator.compile_time());
        assert!(validator.compile_time() > Duration::ZERO);
    }

    #[test]
    fn test_research_examples_pass_schema_and_profile_rules() {
        validator().validate_all(&bp_example()).unwrap();
        validator().validate_all(&heart_rate_spot()).unwrap();
    }

    #[test]
    fn test_status_of_wrong_json_type_is_rejected_with_path() {
        let mut resource = bp_example();
        resource["status"] = json!(5);
        let error = schema_error(&resource);
        assert_eq!(error.resource_type, "Observation");
        assert!(error.issues.iter().any(|i| i.path == "/status"), "{error}");
        assert!(error.to_string().contains("/status"), "{error}");
    }

    #[test]
    fn test_unknown_element_is_rejected_with_its_name() {
        let mut resource = bp_example();
        resource["valueMood"] = json!("happy");
        let error = schema_error(&resource);
        assert!(error.reason().contains("valueMood"), "{error}");
    }

    #[test]
    fn test_r4_sampled_data_period_is_rejected() {
        let mut resource = heart_rate_spot();
        let object = resource.as_object_mut().unwrap();
        object.remove("valueQuantity");
        object.insert(
            "valueSampledData".to_owned(),
            json!({"origin": {"value": 0, "system": "http://unitsofmeasure.org", "code": "/min"},
                   "period": 1000, "dimensions": 1, "data": "60 61 62"}),
        );
        let error = schema_error(&resource);
        assert!(error.reason().contains("period"), "{error}");
        assert!(
            error.issues.iter().any(|i| i.path == "/valueSampledData"),
            "{error}"
        );
        // The R5 form passes.
        resource["valueSampledData"] = json!({
            "origin": {"value": 0, "system": "http://unitsofmeasure.org", "code": "/min"},
            "interval": 1000, "intervalUnit": "ms", "dimensions": 1, "data": "60 61 62"});
        validator().validate(&resource).unwrap();
    }

    #[test]
    fn test_bad_primitive_patterns_are_rejected() {
        let mut resource = bp_example();
        resource["effectiveDateTime"] = json!("2025-06-01T07:31"); // no seconds, no offset
        assert!(
            schema_error(&resource)
                .reason()
                .contains("/effectiveDateTime")
        );
        let mut resource = bp_example();
        resource["id"] = json!("not an id!");
        assert!(schema_error(&resource).reason().contains("/id"));
    }

    #[test]
    fn test_reason_masks_instance_values() {
        let mut resource = bp_example();
        resource["component"][0]["valueQuantity"]["value"] = json!("121");
        let error = schema_error(&resource);
        assert!(
            error
                .issues
                .iter()
                .any(|i| i.path == "/component/0/valueQuantity/value"),
            "{error}"
        );
        assert!(!error.to_string().contains("121"), "{error}");
    }

    #[test]
    fn test_unknown_or_missing_resource_type_is_rejected() {
        let error = schema_error(&json!({"resourceType": "Patient"}));
        assert!(error.reason().contains("no validator"), "{error}");
        let error = schema_error(&json!({"status": "final"}));
        assert_eq!(error.resource_type, "?");
    }

    #[test]
    fn test_reason_lists_a_few_issues_and_counts_the_rest() {
        let mut resource = bp_example();
        resource["identifier"] = Value::Array(vec![json!({"system": 5, "value": 6}); 4]);
        let error = schema_error(&resource);
        assert_eq!(error.issue_count, 8, "{error}");
        assert_eq!(error.issues.len(), MAX_REPORTED_ISSUES);
        assert!(error.reason().ends_with("(and 3 more)"), "{error}");
    }

    #[test]
    fn test_bundle_errors_point_into_the_entry() {
        let mut bad = bp_example();
        bad["status"] = json!(5);
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": bp_example(), "request": {"method": "PUT", "url": "Observation/a"}},
                {"resource": bad, "request": {"method": "PUT", "url": "Observation/b"}}
            ]
        });
        let error = schema_error(&bundle);
        assert_eq!(error.resource_type, "Bundle");
        assert!(
            error
                .issues
                .iter()
                .any(|i| i.path == "/entry/1/resource/status"),
            "{error}"
        );
        let mut good = bundle.clone();
        good["entry"][1]["resource"] = bp_example();
        validator().validate(&good).unwrap();
        good["entry"][1]["request"]["method"] = json!(1);
        assert!(
            schema_error(&good)
                .reason()
                .contains("/entry/1/request/method")
        );
    }

    #[test]
    fn test_missing_or_unknown_status_breaks_profile_rules() {
        let mut resource = bp_example();
        resource.as_object_mut().unwrap().remove("status");
        // The schema cannot see a missing primitive...
        let error = profile_error(&resource);
        assert!(error.issues.iter().any(|i| i.path == "/status"), "{error}");
        // ...nor a code outside its binding.
        resource["status"] = json!("done");
        let error = profile_error(&resource);
        assert!(error.reason().contains("observation-status"), "{error}");
    }

    #[test]
    fn test_vital_signs_need_category_subject_and_effective() {
        let mut resource = heart_rate_spot();
        resource["category"] =
            json!([{"coding": [{"system": OBSERVATION_CATEGORY_SYSTEM, "code": "activity"}]}]);
        resource["subject"] = json!({"reference": "Group/1"});
        resource
            .as_object_mut()
            .unwrap()
            .remove("effectiveDateTime");
        let error = profile_error(&resource);
        let paths: Vec<&str> = error.issues.iter().map(|i| i.path.as_str()).collect();
        assert!(paths.contains(&"/category"), "{error}");
        assert!(paths.contains(&"/subject"), "{error}");
        assert!(
            error
                .reason()
                .contains("effectiveDateTime or effectivePeriod"),
            "{error}"
        );
        let mut resource = heart_rate_spot();
        resource["effectiveDateTime"] = json!("2025-06");
        assert!(profile_error(&resource).reason().contains("vs-1"));
    }

    #[test]
    fn test_vs2_value_components_or_data_absent_reason() {
        let mut resource = heart_rate_spot();
        resource.as_object_mut().unwrap().remove("valueQuantity");
        assert!(profile_error(&resource).reason().contains("vs-2"));
        resource["dataAbsentReason"] = json!({"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}]});
        check_profile_rules(&resource, FhirVersion::R5).unwrap();
    }

    #[test]
    fn test_vs3_components_need_values() {
        let mut resource = bp_example();
        resource["component"][1]
            .as_object_mut()
            .unwrap()
            .remove("valueQuantity");
        let error = profile_error(&resource);
        assert!(error.reason().contains("vs-3"), "{error}");
        assert!(error.issues.iter().any(|i| i.path == "/component/1"));
    }

    #[test]
    fn test_fixed_ucum_codes_of_profiles_are_enforced() {
        let mut resource = bp_example();
        resource["component"][0]["valueQuantity"]["code"] = json!("mmHg");
        let error = profile_error(&resource);
        assert!(
            error
                .issues
                .iter()
                .any(|i| i.path == "/component/0/valueQuantity/code"),
            "{error}"
        );
        let mut resource = heart_rate_spot();
        resource["valueQuantity"]["code"] = json!("{beats}/min");
        assert!(
            profile_error(&resource)
                .reason()
                .contains("/valueQuantity/code")
        );
        let mut resource = heart_rate_spot();
        resource["valueQuantity"]["system"] = json!("http://example.org/units");
        assert!(profile_error(&resource).reason().contains("unitsofmeasure"));
        let mut resource = heart_rate_spot();
        resource["valueQuantity"]
            .as_object_mut()
            .unwrap()
            .remove("unit");
        assert!(profile_error(&resource).reason().contains("needs a unit"));
    }

    #[test]
    fn test_profiles_require_their_codes_and_components() {
        let mut resource = bp_example();
        resource["component"].as_array_mut().unwrap().remove(1);
        assert!(profile_error(&resource).reason().contains("8462-4"));
        let mut resource = heart_rate_spot();
        resource["code"] = json!({"coding": [{"system": "http://loinc.org", "code": "40443-4"}]});
        assert!(profile_error(&resource).reason().contains("8867-4"));
    }

    #[test]
    fn test_obs6_and_obs7_are_enforced() {
        let mut resource = heart_rate_spot();
        resource["dataAbsentReason"] = json!({"text": "unknown"});
        assert!(profile_error(&resource).reason().contains("obs-6"));
        let mut resource = heart_rate_spot();
        resource["component"] = json!([{
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 64, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}}]);
        assert!(profile_error(&resource).reason().contains("obs-7"));
    }

    #[test]
    fn test_device_and_association_bindings_are_enforced() {
        let device = json!({"resourceType": "Device", "status": "on",
                            "name": [{"value": "ScanWatch", "type": "model-name"}]});
        let error = profile_error(&device);
        let paths: Vec<&str> = error.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["/status", "/name/0/type"], "{error}");
        let association = json!({"resourceType": "DeviceAssociation",
            "device": {"reference": "Device/x"},
            "status": {"coding": [{"system": "http://example.org", "code": "attached"}]}});
        assert!(
            profile_error(&association)
                .reason()
                .contains("deviceassociation-status")
        );
    }

    fn r4() -> &'static FhirValidator {
        static VALIDATOR: std::sync::OnceLock<FhirValidator> = std::sync::OnceLock::new();
        VALIDATOR.get_or_init(|| FhirValidator::new(FhirVersion::R4).unwrap())
    }

    fn r4_device() -> Value {
        json!({"resourceType": "Device", "id": "d1", "status": "active",
               "manufacturer": "Withings", "modelNumber": "BPM Connect",
               "deviceName": [{"name": "BPM Connect", "type": "user-friendly-name"}],
               "patient": {"reference": "Patient/7"}})
    }

    #[test]
    fn test_the_r4_validator_compiles_without_device_association() {
        let r4 = r4();
        assert_eq!(r4.version(), FhirVersion::R4);
        eprintln!("FhirValidator::new(R4) took {:?}", r4.compile_time());
        let keys: Vec<&str> = r4.validators.keys().copied().collect();
        assert_eq!(
            keys,
            ["Bundle", "Device", "DiagnosticReport", "Observation"]
        );
    }

    #[test]
    fn test_vital_signs_observations_are_valid_r4_as_mapped() {
        r4().validate_all(&bp_example()).unwrap();
        r4().validate_all(&heart_rate_spot()).unwrap();
    }

    #[test]
    fn test_r4_takes_device_name_and_patient_and_r5_rejects_them() {
        r4().validate_all(&r4_device()).unwrap();
        let error = validator().validate(&r4_device()).unwrap_err();
        assert_eq!(error.kind, ValidationKind::Schema);
        assert!(error.reason().contains("deviceName"), "{error}");
    }

    #[test]
    fn test_r4_rejects_what_only_r5_has() {
        let mut device = r4_device();
        device["displayName"] = json!("Withings BPM Connect");
        let error = r4().validate(&device).unwrap_err();
        assert!(error.reason().contains("displayName"), "{error}");
        let association = json!({"resourceType": "DeviceAssociation", "device": {"reference": "Device/d1"},
            "status": {"coding": [{"system": DEVICE_ASSOCIATION_STATUS_SYSTEM, "code": "attached"}]}});
        let error = r4().validate(&association).unwrap_err();
        assert!(
            error
                .reason()
                .contains("no validator for resource type `DeviceAssociation`"),
            "{error}"
        );
        let mut obs = heart_rate_spot();
        obs["valueSampledData"] =
            json!({"origin": {"value": 0}, "interval": 2, "intervalUnit": "ms", "dimensions": 1});
        obs.as_object_mut().unwrap().remove("valueQuantity");
        let error = r4().validate(&obs).unwrap_err();
        assert!(error.reason().contains("interval"), "{error}");
    }

    #[test]
    fn test_r4_device_bindings_are_the_r4_ones() {
        let mut device = r4_device();
        device["deviceName"][0]["type"] = json!("registered-name");
        device["status"] = json!("unknown");
        let error = check_profile_rules(&device, FhirVersion::R4).unwrap_err();
        let paths: Vec<&str> = error.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/deviceName/0/type"],
            "unknown is an R4 status, registered-name is not an R4 name type: {error}"
        );
        device["deviceName"][0]
            .as_object_mut()
            .unwrap()
            .remove("name");
        let error = check_profile_rules(&device, FhirVersion::R4).unwrap_err();
        assert!(
            error
                .reason()
                .contains("Device.deviceName.name is required"),
            "{error}"
        );
    }

    #[test]
    fn test_r4_sampled_data_needs_a_period() {
        let mut obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "ECG"},
            "component": [{"code": {"text": "lead I"},
                "valueSampledData": {"origin": {"value": 0}, "dimensions": 1, "data": "1 2"}}]});
        let error = r4().validate_all(&obs).unwrap_err();
        assert_eq!(error.kind, ValidationKind::Profile);
        assert_eq!(error.issues[0].path, "/component/0/valueSampledData/period");
        obs["component"][0]["valueSampledData"]["period"] = json!(2);
        r4().validate_all(&obs).unwrap();
    }
}
