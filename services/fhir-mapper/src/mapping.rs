//! The mapping table: codes, displays, units, categories and profiles of every ohx data type,
//! loaded from TOML (`mapping.toml` next to `Cargo.toml` is the built-in default; a deployment
//! can override it at run time). The table is checked when it is loaded, so a bad table stops
//! the service at start-up instead of dead-lettering every record.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The built-in table (`services/fhir-mapper/mapping.toml`).
pub const DEFAULT_TABLE_TOML: &str = include_str!("../mapping.toml");

/// The table format this build understands (the `format` key of the table).
pub const TABLE_FORMAT: u32 = 1;

/// Codes of R5 `Device.name.type` (required binding `DeviceNameType`).
pub const DEVICE_NAME_TYPES: [&str; 3] = [
    "registered-name",
    "user-friendly-name",
    "patient-reported-name",
];

/// Codes of R5 `Device.status` (required binding `FHIRDeviceStatus`).
pub const DEVICE_STATUSES: [&str; 3] = ["active", "inactive", "entered-in-error"];

/// Codes of R5 `DeviceAssociation.status` (required binding `DeviceAssociationStatus`).
pub const DEVICE_ASSOCIATION_STATUSES: [&str; 5] = [
    "implanted",
    "explanted",
    "attached",
    "entered-in-error",
    "unknown",
];

/// System of the `DeviceAssociation.status` codes.
pub const DEVICE_ASSOCIATION_STATUS_SYSTEM: &str = "http://hl7.org/fhir/deviceassociation-status";

/// Why a mapping table could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MappingTableError {
    /// The file could not be read.
    #[error("cannot read mapping table {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML or does not have the table's shape (unknown keys are errors).
    #[error("mapping table is not valid TOML of the expected shape: {0}")]
    Parse(#[from] toml::de::Error),
    /// The table parsed but breaks a rule (named in the message).
    #[error("mapping table is invalid: {0}")]
    Invalid(String),
}

/// One FHIR `Coding`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coding {
    /// The code system URI.
    pub system: String,
    /// The code.
    pub code: String,
    /// The human display (informational).
    #[serde(default)]
    pub display: Option<String>,
}

/// A UCUM unit allowed for a value, with its human-readable `Quantity.unit`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    /// UCUM code (`Quantity.code`), compared with the unit of the input record.
    pub code: String,
    /// Human-readable unit (`Quantity.unit`), e.g. `mmHg` for `mm[Hg]`.
    pub display: String,
}

/// Settings of the Device and DeviceAssociation resources.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTable {
    /// `Device.name.type` of the provider's model name.
    pub name_type: String,
    /// `Device.status`, if one is to be written.
    #[serde(default)]
    pub status: Option<String>,
    /// `DeviceAssociation.status` coding.
    pub association_status: Coding,
}

/// Per-provider data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderEntry {
    /// `Device.manufacturer` when the record's device names none (none: left out).
    #[serde(default)]
    pub manufacturer: Option<String>,
}

/// How one Measurement component becomes an Observation value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueEntry {
    /// The Measurement component code (`value`, `systolic`, ...).
    pub source: String,
    /// Allowed UCUM units; the record's unit must be one of them.
    pub units: Vec<Unit>,
    /// Round the value to this many decimals (none: written as received).
    #[serde(default)]
    pub decimals: Option<u32>,
    /// The value is a code (an integer with unit `1`): written as `valueCodeableConcept` with
    /// the codings of its value (as text); a value not listed is a mapping error.
    #[serde(default)]
    pub codes: BTreeMap<String, Vec<Coding>>,
}

/// One `Observation.component` of a panel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentEntry {
    /// The Measurement component code (`systolic`, `diastolic`, ...).
    pub source: String,
    /// Codings of `Observation.component.code`.
    pub code: Vec<Coding>,
    /// `Observation.component.code.text`.
    #[serde(default)]
    pub text: Option<String>,
    /// Allowed UCUM units; the record's unit must be one of them.
    pub units: Vec<Unit>,
    /// Round the value to this many decimals (none: written as received).
    #[serde(default)]
    pub decimals: Option<u32>,
    /// The record may lack this component (it is then left out); else a record without it
    /// is a mapping error.
    #[serde(default)]
    pub optional: bool,
    /// A yes/no flag: written as `valueBoolean` (0 = false, anything else true).
    #[serde(default)]
    pub boolean: bool,
}

/// How a Measurement of one data type becomes an Observation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasurementEntry {
    /// `meta.profile`.
    #[serde(default)]
    pub profile: Option<String>,
    /// Codings of the single `Observation.category`.
    pub category: Vec<Coding>,
    /// Codings of `Observation.code`.
    pub code: Vec<Coding>,
    /// `Observation.code.text`.
    #[serde(default)]
    pub text: Option<String>,
    /// A single value (`Observation.valueQuantity`).
    #[serde(default)]
    pub value: Option<ValueEntry>,
    /// Components, in output order: a panel without `value` (blood pressure), or the parts of
    /// a value (a night's sleep and its stages).
    #[serde(default)]
    pub components: Vec<ComponentEntry>,
    /// The record's sample series (`Measurement::waveform`), written as one more component
    /// with `valueSampledData` (an ECG lead). A record of this type must have one.
    #[serde(default)]
    pub waveform: Option<WaveformEntry>,
    /// Components that become Observations of their own, `derivedFrom` this one (an ECG's
    /// heart rate).
    #[serde(default)]
    pub linked: Vec<LinkedEntry>,
    /// A DiagnosticReport of each record, whose `result` is this Observation and the linked
    /// ones (an ECG study).
    #[serde(default)]
    pub report: Option<ReportEntry>,
}

impl MeasurementEntry {
    /// Whether `source` is a component of the record this entry reads: the value, a component,
    /// a linked Observation's value or the report's conclusion.
    pub fn reads(&self, source: &str) -> bool {
        self.value.as_ref().is_some_and(|v| v.source == source)
            || self.components.iter().any(|c| c.source == source)
            || self.linked.iter().any(|l| l.source == source)
            || self
                .report
                .as_ref()
                .and_then(|r| r.conclusion.as_ref())
                .is_some_and(|c| c.source == source)
    }
}

/// The component of a record's sample series.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveformEntry {
    /// Codings of `Observation.component.code` (the lead).
    pub code: Vec<Coding>,
    /// `Observation.component.code.text`.
    #[serde(default)]
    pub text: Option<String>,
    /// Allowed UCUM units of the samples (`SampledData.origin`).
    pub units: Vec<Unit>,
    /// Decimal places of `SampledData.interval` (1000/300 ms is written `3.333333` with 6).
    pub interval_decimals: u32,
    /// The samples are codes: the record must name the ConceptMap defining them (`codeMap`);
    /// else it must not.
    #[serde(default)]
    pub coded: bool,
}

/// A component of a record that becomes an Observation of its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkedEntry {
    /// The Measurement component (`heart_rate`).
    pub source: String,
    /// The measurement entry the Observation is mapped with; its `value` reads the component.
    pub data_type: String,
}

/// The DiagnosticReport of a record.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportEntry {
    /// Codings of the single `DiagnosticReport.category`.
    pub category: Vec<Coding>,
    /// Codings of `DiagnosticReport.code`.
    pub code: Vec<Coding>,
    /// `DiagnosticReport.conclusionCode` from a coded component.
    #[serde(default)]
    pub conclusion: Option<ConclusionEntry>,
}

/// A coded component (an integer with unit `1`) written as `DiagnosticReport.conclusionCode`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConclusionEntry {
    /// The Measurement component (`rhythm`).
    pub source: String,
    /// Codings of each value the component may have (an integer, as text); a value not listed
    /// is a mapping error.
    pub codes: BTreeMap<String, Vec<Coding>>,
}

/// A field of an `HourlyAggregate` that becomes a statistic component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Statistic {
    /// `HourlyAggregate::mean`.
    Mean,
    /// `HourlyAggregate::min`.
    Min,
    /// `HourlyAggregate::max`.
    Max,
    /// `HourlyAggregate::count` (written as `valueInteger`).
    Count,
    /// `HourlyAggregate::sum`.
    Sum,
}

/// One statistic component of an hourly aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticEntry {
    /// Which aggregate field.
    pub statistic: Statistic,
    /// The `http://hl7.org/fhir/observation-statistics` coding.
    pub code: Coding,
    /// Round the value to this many decimals (none: written as received).
    #[serde(default)]
    pub decimals: Option<u32>,
}

/// How an HourlyAggregate of one data type becomes an Observation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateEntry {
    /// `meta.profile`.
    #[serde(default)]
    pub profile: Option<String>,
    /// Codings of the single `Observation.category`.
    pub category: Vec<Coding>,
    /// Codings of `Observation.code`.
    pub code: Vec<Coding>,
    /// `Observation.code.text`.
    #[serde(default)]
    pub text: Option<String>,
    /// Allowed UCUM units of the aggregate; its `unit` must be one of them.
    pub units: Vec<Unit>,
    /// The statistic written as `Observation.valueQuantity` (steps per hour: `sum`), if any.
    #[serde(default)]
    pub value: Option<ValueStatistic>,
    /// Statistic components, in output order.
    #[serde(default)]
    pub statistics: Vec<StatisticEntry>,
}

/// The statistic of an hour that is the Observation's value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueStatistic {
    /// Which aggregate field (not `count`: a value in the aggregate's unit).
    pub statistic: Statistic,
    /// Round the value to this many decimals (none: written as received).
    #[serde(default)]
    pub decimals: Option<u32>,
}

/// A loaded and checked mapping table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Table format; must equal [`TABLE_FORMAT`].
    pub format: u32,
    /// Device and DeviceAssociation settings.
    pub device: DeviceTable,
    /// Per-provider data, keyed by provider (`withings`, ...).
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderEntry>,
    /// Spot measurements, keyed by ohx data type.
    #[serde(default)]
    pub measurements: BTreeMap<String, MeasurementEntry>,
    /// Hourly aggregates, keyed by ohx data type.
    #[serde(default)]
    pub aggregates: BTreeMap<String, AggregateEntry>,
}

impl Mapping {
    /// The built-in table compiled from `mapping.toml`.
    pub fn default_table() -> Result<Self, MappingTableError> {
        Self::from_toml_str(DEFAULT_TABLE_TOML)
    }

    /// Parses and checks a table from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, MappingTableError> {
        let table: Mapping = toml::from_str(text)?;
        table.check()?;
        Ok(table)
    }

    /// Reads, parses and checks a table file (a deployment's override).
    pub fn from_file(path: &Path) -> Result<Self, MappingTableError> {
        let text = std::fs::read_to_string(path).map_err(|source| MappingTableError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// The entry of a spot-measurement data type.
    pub fn measurement(&self, data_type: &str) -> Option<&MeasurementEntry> {
        self.measurements.get(data_type)
    }

    /// The entry of an hourly-aggregate data type.
    pub fn aggregate(&self, data_type: &str) -> Option<&AggregateEntry> {
        self.aggregates.get(data_type)
    }

    /// The entry of a provider.
    pub fn provider(&self, provider: &str) -> Option<&ProviderEntry> {
        self.providers.get(provider)
    }

    /// Checks the rules a parsed table must follow.
    fn check(&self) -> Result<(), MappingTableError> {
        if self.format != TABLE_FORMAT {
            return invalid(format!(
                "format {} is not supported (expected {TABLE_FORMAT})",
                self.format
            ));
        }
        check_device(&self.device)?;
        for (name, provider) in &self.providers {
            check_token("provider name", name)?;
            if let Some(manufacturer) = &provider.manufacturer {
                check_text(&format!("providers.{name}.manufacturer"), manufacturer)?;
            }
        }
        for (data_type, entry) in &self.measurements {
            check_measurement(data_type, entry)?;
        }
        check_links(&self.measurements)?;
        for (data_type, entry) in &self.aggregates {
            check_aggregate(data_type, entry)?;
        }
        Ok(())
    }
}

fn invalid<T>(message: String) -> Result<T, MappingTableError> {
    Err(MappingTableError::Invalid(message))
}

fn check_device(device: &DeviceTable) -> Result<(), MappingTableError> {
    if !DEVICE_NAME_TYPES.contains(&device.name_type.as_str()) {
        return invalid(format!(
            "device.name_type `{}` is not one of {DEVICE_NAME_TYPES:?}",
            device.name_type
        ));
    }
    if let Some(status) = &device.status
        && !DEVICE_STATUSES.contains(&status.as_str())
    {
        return invalid(format!(
            "device.status `{status}` is not one of {DEVICE_STATUSES:?}"
        ));
    }
    let status = &device.association_status;
    check_coding("device.association_status", status)?;
    if status.system != DEVICE_ASSOCIATION_STATUS_SYSTEM
        || !DEVICE_ASSOCIATION_STATUSES.contains(&status.code.as_str())
    {
        return invalid(format!(
            "device.association_status must be a code of {DEVICE_ASSOCIATION_STATUS_SYSTEM} \
             ({DEVICE_ASSOCIATION_STATUSES:?})"
        ));
    }
    Ok(())
}

fn check_measurement(data_type: &str, entry: &MeasurementEntry) -> Result<(), MappingTableError> {
    let at = format!("measurements.{data_type}");
    check_token("data type", data_type)?;
    check_common(&at, entry.profile.as_deref(), &entry.category, &entry.code)?;
    if entry.value.is_none() && entry.components.is_empty() && entry.waveform.is_none() {
        return invalid(format!("{at}: needs `value`, `components` or `waveform`"));
    }
    if let Some(value) = &entry.value
        && entry.components.iter().any(|c| c.source == value.source)
    {
        return invalid(format!(
            "{at}: `{}` is both the value and a component",
            value.source
        ));
    }
    if let Some(value) = &entry.value {
        check_token(&format!("{at}.value.source"), &value.source)?;
        check_units(&format!("{at}.value"), &value.units)?;
        check_decimals(&format!("{at}.value"), value.decimals)?;
        check_codes(&format!("{at}.value.codes"), &value.codes)?;
    }
    let mut sources: BTreeSet<&str> = entry.value.iter().map(|v| v.source.as_str()).collect();
    for component in &entry.components {
        let at = format!("{at}.components.{}", component.source);
        check_token(&at, &component.source)?;
        if !sources.insert(component.source.as_str()) {
            return invalid(format!("{at}: component source appears twice"));
        }
        check_codings(&format!("{at}.code"), &component.code)?;
        check_units(&at, &component.units)?;
        check_decimals(&at, component.decimals)?;
    }
    if let Some(waveform) = &entry.waveform {
        check_codings(&format!("{at}.waveform.code"), &waveform.code)?;
        check_units(&format!("{at}.waveform"), &waveform.units)?;
        check_decimals(&format!("{at}.waveform"), Some(waveform.interval_decimals))?;
    }
    for linked in &entry.linked {
        check_token(&format!("{at}.linked.source"), &linked.source)?;
        check_token(&format!("{at}.linked.data_type"), &linked.data_type)?;
        if !sources.insert(linked.source.as_str()) {
            return invalid(format!("{at}.linked.{}: source read twice", linked.source));
        }
    }
    if let Some(report) = &entry.report {
        check_codings(&format!("{at}.report.category"), &report.category)?;
        check_codings(&format!("{at}.report.code"), &report.code)?;
        if let Some(conclusion) = &report.conclusion {
            let at = format!("{at}.report.conclusion");
            check_token(&at, &conclusion.source)?;
            if !sources.insert(conclusion.source.as_str()) {
                return invalid(format!("{at}: source `{}` read twice", conclusion.source));
            }
            if conclusion.codes.is_empty() {
                return invalid(format!("{at}: needs codes"));
            }
            check_codes(&format!("{at}.codes"), &conclusion.codes)?;
        }
    }
    Ok(())
}

/// Codes keyed by integers, each with codings.
fn check_codes(at: &str, codes: &BTreeMap<String, Vec<Coding>>) -> Result<(), MappingTableError> {
    for (value, codings) in codes {
        if value.parse::<i64>().is_err() {
            return invalid(format!("{at}: `{value}` is not an integer"));
        }
        check_codings(&format!("{at}.{value}"), codings)?;
    }
    Ok(())
}

/// Each linked data type is a measurement entry with a value and nothing linked itself.
fn check_links(measurements: &BTreeMap<String, MeasurementEntry>) -> Result<(), MappingTableError> {
    for (data_type, entry) in measurements {
        for linked in &entry.linked {
            match measurements.get(&linked.data_type) {
                Some(target)
                    if target.value.is_some()
                        && target.components.is_empty()
                        && target.linked.is_empty()
                        && target.waveform.is_none()
                        && target.report.is_none() => {}
                _ => {
                    return invalid(format!(
                        "measurements.{data_type}.linked: `{}` must be a measurement with a \
                         value only",
                        linked.data_type
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_aggregate(data_type: &str, entry: &AggregateEntry) -> Result<(), MappingTableError> {
    let at = format!("aggregates.{data_type}");
    check_token("data type", data_type)?;
    check_common(&at, entry.profile.as_deref(), &entry.category, &entry.code)?;
    check_units(&at, &entry.units)?;
    if entry.statistics.is_empty() && entry.value.is_none() {
        return invalid(format!("{at}: needs a value or at least one statistic"));
    }
    if let Some(value) = &entry.value {
        check_decimals(&format!("{at}.value"), value.decimals)?;
        if value.statistic == Statistic::Count {
            return invalid(format!(
                "{at}.value: a count is not a quantity in the aggregate's unit"
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for statistic in &entry.statistics {
        let at = format!("{at}.statistics.{:?}", statistic.statistic);
        if !seen.insert(statistic.statistic) {
            return invalid(format!("{at}: statistic appears twice"));
        }
        check_coding(&format!("{at}.code"), &statistic.code)?;
        check_decimals(&at, statistic.decimals)?;
        if statistic.statistic == Statistic::Count && statistic.decimals.is_some() {
            return invalid(format!(
                "{at}: a count is an integer and takes no `decimals`"
            ));
        }
    }
    Ok(())
}

fn check_common(
    at: &str,
    profile: Option<&str>,
    category: &[Coding],
    code: &[Coding],
) -> Result<(), MappingTableError> {
    if let Some(profile) = profile {
        check_uri(&format!("{at}.profile"), profile)?;
    }
    check_codings(&format!("{at}.category"), category)?;
    check_codings(&format!("{at}.code"), code)
}

fn check_codings(at: &str, codings: &[Coding]) -> Result<(), MappingTableError> {
    if codings.is_empty() {
        return invalid(format!("{at}: needs at least one coding"));
    }
    codings
        .iter()
        .try_for_each(|coding| check_coding(at, coding))
}

fn check_coding(at: &str, coding: &Coding) -> Result<(), MappingTableError> {
    check_uri(&format!("{at}.system"), &coding.system)?;
    // FHIR `code`: no leading/trailing whitespace, single inner spaces only.
    if coding.code.is_empty()
        || coding
            .code
            .split(' ')
            .any(|part| part.is_empty() || part.contains(char::is_whitespace))
    {
        return invalid(format!("{at}: code `{}` is not a FHIR code", coding.code));
    }
    if let Some(display) = &coding.display {
        check_text(&format!("{at}.display"), display)?;
    }
    Ok(())
}

fn check_units(at: &str, units: &[Unit]) -> Result<(), MappingTableError> {
    if units.is_empty() {
        return invalid(format!("{at}: needs at least one unit"));
    }
    let mut seen = BTreeSet::new();
    for unit in units {
        check_token(&format!("{at}.units"), &unit.code)?;
        check_text(&format!("{at}.units.display"), &unit.display)?;
        if !seen.insert(unit.code.as_str()) {
            return invalid(format!("{at}: unit `{}` appears twice", unit.code));
        }
    }
    Ok(())
}

fn check_decimals(at: &str, decimals: Option<u32>) -> Result<(), MappingTableError> {
    match decimals {
        Some(d) if d > 9 => invalid(format!("{at}: decimals must be at most 9")),
        _ => Ok(()),
    }
}

fn check_uri(at: &str, uri: &str) -> Result<(), MappingTableError> {
    if uri.is_empty() || uri.contains(char::is_whitespace) || !uri.contains(':') {
        return invalid(format!("{at}: `{uri}` is not an absolute URI"));
    }
    Ok(())
}

fn check_token(at: &str, token: &str) -> Result<(), MappingTableError> {
    if token.is_empty() || token.contains(char::is_whitespace) {
        return invalid(format!(
            "{at}: `{token}` must be non-empty without whitespace"
        ));
    }
    Ok(())
}

fn check_text(at: &str, text: &str) -> Result<(), MappingTableError> {
    if text.trim().is_empty() || text.trim() != text {
        return invalid(format!(
            "{at}: must be non-empty text without surrounding whitespace"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn test_default_table_loads_with_all_scoped_data_types() {
        let table = Mapping::default_table().unwrap();
        for data_type in ["blood_pressure", "heart_rate", "body_weight"] {
            assert!(table.measurement(data_type).is_some(), "{data_type}");
        }
        let hr = table.aggregate("heart_rate").unwrap();
        let stats: Vec<_> = hr.statistics.iter().map(|s| s.statistic).collect();
        assert_eq!(
            stats,
            [
                Statistic::Mean,
                Statistic::Min,
                Statistic::Max,
                Statistic::Count
            ]
        );
        for provider in ["withings", "google-health", "omron", "beurer"] {
            assert!(table.provider(provider).is_some(), "{provider}");
        }
        assert_eq!(table.provider("withings").unwrap().manufacturer, None);
        assert_eq!(
            table.provider("omron").unwrap().manufacturer.as_deref(),
            Some("OMRON Healthcare")
        );
    }

    #[test]
    fn test_table_rejects_unknown_keys() {
        let text = DEFAULT_TABLE_TOML.replace("name_type =", "nametype =");
        assert!(matches!(
            Mapping::from_toml_str(&text),
            Err(MappingTableError::Parse(_))
        ));
    }

    #[test]
    fn test_table_rejects_the_value_repeated_as_a_component() {
        let with = |source: &str| {
            format!(
                "{DEFAULT_TABLE_TOML}\n[[measurements.heart_rate.components]]\nsource = \"{source}\"\n\
                 code = [{{ system = \"http://loinc.org\", code = \"1-1\" }}]\n\
                 units = [{{ code = \"/min\", display = \"/min\" }}]\n"
            )
        };
        // a value with its parts is a valid shape (a night's sleep and its stages)
        assert!(Mapping::from_toml_str(&with("x")).is_ok());
        let err = Mapping::from_toml_str(&with("value")).unwrap_err();
        assert!(
            err.to_string().contains("both the value and a component"),
            "{err}"
        );
    }

    #[test]
    fn test_table_rejects_unknown_statistic_and_bad_bindings() {
        let text = DEFAULT_TABLE_TOML.replace("statistic = \"max\"", "statistic = \"median\"");
        assert!(matches!(
            Mapping::from_toml_str(&text),
            Err(MappingTableError::Parse(_))
        ));
        let text = DEFAULT_TABLE_TOML.replace(
            "name_type = \"user-friendly-name\"",
            "name_type = \"model-name\"",
        );
        let err = Mapping::from_toml_str(&text).unwrap_err();
        assert!(err.to_string().contains("device.name_type"), "{err}");
        let text = DEFAULT_TABLE_TOML.replace("code = \"attached\"", "code = \"paired\"");
        assert!(Mapping::from_toml_str(&text).is_err());
    }

    #[test]
    fn test_table_rejects_other_format_and_empty_units() {
        let text = DEFAULT_TABLE_TOML.replace("format = 1", "format = 2");
        assert!(Mapping::from_toml_str(&text).is_err());
        let text = DEFAULT_TABLE_TOML.replace(
            "units = [{ code = \"/min\", display = \"beats/minute\" }] }",
            "units = [] }",
        );
        let err = Mapping::from_toml_str(&text).unwrap_err();
        assert!(err.to_string().contains("at least one unit"), "{err}");
    }

    #[test]
    fn test_table_loads_from_file() {
        let dir = std::env::temp_dir().join(format!("ohx-mapping-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mapping.toml");
        std::fs::write(&path, DEFAULT_TABLE_TOML).unwrap();
        assert_eq!(
            Mapping::from_file(&path).unwrap(),
            Mapping::default_table().unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            Mapping::from_file(&path),
            Err(MappingTableError::Io { .. })
        ));
    }
}
