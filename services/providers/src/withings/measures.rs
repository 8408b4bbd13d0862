//! The Withings measure table (`measures.toml`): notification categories → fetch categories →
//! `getmeas` types → Measurement data types, components and units. Loaded and checked once.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// The table compiled into the binary.
pub const BUILTIN: &str = include_str!("measures.toml");

/// The user-profile notification category (`action=delete` / `unlink` end a link).
pub const APPLI_USER: i32 = 46;

/// Why a table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("withings measure table: {0}")]
pub struct TableError(pub String);

/// What one measure type becomes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeRule {
    pub data_type: String,
    #[serde(default = "value_component")]
    pub component: String,
    /// UCUM unit of the value after `shift`.
    pub unit: String,
    /// Power of ten applied to the decoded value (height: m → cm is 2).
    #[serde(default)]
    pub shift: i32,
    /// The value is a code, and 0 one of them (else 0 is no reading).
    #[serde(default)]
    pub zero_is_value: bool,
}

fn value_component() -> String {
    "value".to_owned()
}

/// What one intraday field becomes (HOURLY measurements).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntradayRule {
    /// The `data_fields` name.
    pub field: String,
    pub data_type: String,
    /// UCUM unit of the value.
    pub unit: String,
    /// Tag in the measurement id.
    pub id: String,
    /// Whether 0 is a measured value (steps) rather than no reading.
    #[serde(default)]
    pub zero_is_value: bool,
}

/// What one field of a `getactivity` day row becomes (INDIVIDUAL, one per day).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyRule {
    /// The `data_fields` name.
    pub field: String,
    pub data_type: String,
    /// UCUM unit of the value.
    pub unit: String,
    /// Tag in the measurement id.
    pub id: String,
}

/// One value of a night's summary.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepPart {
    pub component: String,
    /// The field of the summary's `data`.
    pub field: String,
    /// UCUM unit after dividing.
    pub unit: String,
    /// The field's value is divided by it (seconds → minutes: 60).
    #[serde(default = "one")]
    pub divisor: f64,
}

fn one() -> f64 {
    1.0
}

/// A data type made of a night's summary fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepRule {
    /// Tag in the measurement id.
    pub id: String,
    /// The first is the value.
    pub parts: Vec<SleepPart>,
}

/// The night's hypnogram from `v2/sleep get`: its stages sampled every `epoch_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypnogramRule {
    pub data_type: String,
    /// Tag in the measurement id.
    pub id: String,
    /// Seconds between two samples.
    pub epoch_seconds: u32,
    /// Canonical URL of the ConceptMap defining the sample codes.
    pub code_map: String,
    /// Withings `state` → sample code; a state not listed, and time no segment covers, is
    /// `unknown`.
    pub states: BTreeMap<String, i32>,
    /// The sample code of time without a known stage.
    pub unknown: i32,
    /// Data type → a series of the same call averaged over the night.
    #[serde(default)]
    pub averages: BTreeMap<String, NightAverage>,
}

/// A `v2/sleep get` series (`{epoch: value}` per segment) averaged over the night.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NightAverage {
    /// The `data_fields` name.
    pub field: String,
    /// UCUM unit of the values.
    pub unit: String,
    /// Tag in the measurement id.
    pub id: String,
}

impl HypnogramRule {
    /// The sample code of a Withings sleep `state`.
    #[must_use]
    pub fn code_of(&self, state: i64) -> i32 {
        self.states
            .get(&state.to_string())
            .copied()
            .unwrap_or(self.unknown)
    }
}

/// The sleep summary's category and data types.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sleep {
    pub category: String,
    /// Data type → its rule.
    pub types: BTreeMap<String, SleepRule>,
    /// The hypnogram of each night (one `v2/sleep get` call per night).
    #[serde(default)]
    pub hypnogram: Option<HypnogramRule>,
}

/// The category whose fetch lists the user's devices.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    pub category: String,
}

/// The category whose fetch lists the ECG recordings (`v2/heart list`) and reads each
/// signal (`v2/heart get`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartRule {
    pub category: String,
    pub data_type: String,
    /// Tag in the measurement id.
    pub id: String,
    /// UCUM unit of the signal's samples.
    pub unit: String,
    /// The device's `afib` result → the mapping table's rhythm code.
    pub rhythm: BTreeMap<String, i64>,
    /// Model number → model name.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
}

impl HeartRule {
    /// The rhythm code of an `afib` result, if the table knows it.
    #[must_use]
    pub fn rhythm_of(&self, afib: i64) -> Option<i64> {
        self.rhythm.get(&afib.to_string()).copied()
    }

    /// The model name of a model number, if the table knows it.
    #[must_use]
    pub fn model_name(&self, model: i64) -> Option<&str> {
        self.models.get(&model.to_string()).map(String::as_str)
    }
}

/// A data type made of several measure types of one group.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Panel {
    /// In output order.
    pub components: Vec<String>,
    /// Ends the measurement id.
    pub id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    format: u32,
    notify: BTreeMap<String, Vec<String>>,
    getmeas: BTreeMap<String, Vec<i32>>,
    intraday: BTreeMap<String, IntradayRule>,
    #[serde(default)]
    daily: BTreeMap<String, DailyRule>,
    #[serde(default)]
    sleep: Option<Sleep>,
    #[serde(default)]
    devices: Option<Devices>,
    #[serde(default)]
    heart: Option<HeartRule>,
    #[serde(default)]
    panels: BTreeMap<String, Panel>,
    types: BTreeMap<String, TypeRule>,
}

/// The checked table.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureTable {
    notify: BTreeMap<i32, Vec<String>>,
    getmeas: BTreeMap<String, Vec<i32>>,
    intraday: BTreeMap<String, IntradayRule>,
    daily: BTreeMap<String, DailyRule>,
    sleep: Sleep,
    devices: Option<Devices>,
    heart: Option<HeartRule>,
    panels: BTreeMap<String, Panel>,
    types: BTreeMap<i32, TypeRule>,
}

fn int_key(section: &str, key: &str) -> Result<i32, TableError> {
    key.parse()
        .map_err(|_| TableError(format!("[{section}] key {key:?} is not an integer")))
}

impl MeasureTable {
    /// The table compiled into the binary.
    ///
    /// # Errors
    /// When the compiled-in table is inconsistent (a test keeps it from shipping so).
    pub fn builtin() -> Result<Self, TableError> {
        Self::from_toml(BUILTIN)
    }

    /// Parses and checks a table: every type of a fetch category is described, every
    /// notification names known categories, a panel's types name its components and each
    /// component once, units are not empty.
    ///
    /// # Errors
    /// The first inconsistency found.
    pub fn from_toml(text: &str) -> Result<Self, TableError> {
        let raw: Raw = toml::from_str(text).map_err(|e| TableError(e.to_string()))?;
        if raw.format != 1 {
            return Err(TableError(format!("unknown format {}", raw.format)));
        }
        let mut types = BTreeMap::new();
        for (k, rule) in raw.types {
            let t = int_key("types", &k)?;
            if rule.unit.trim().is_empty() || rule.data_type.trim().is_empty() {
                return Err(TableError(format!("type {t}: empty data type or unit")));
            }
            match raw.panels.get(&rule.data_type) {
                Some(p) if !p.components.contains(&rule.component) => {
                    return Err(TableError(format!(
                        "type {t}: component {:?} is not one of panel {}",
                        rule.component, rule.data_type
                    )));
                }
                None if rule.component != "value" => {
                    return Err(TableError(format!(
                        "type {t}: component {:?} outside a panel",
                        rule.component
                    )));
                }
                _ => {}
            }
            types.insert(t, rule);
        }
        for (name, panel) in &raw.panels {
            for c in &panel.components {
                let n = types
                    .values()
                    .filter(|r| &r.data_type == name && &r.component == c)
                    .count();
                if n != 1 {
                    return Err(TableError(format!(
                        "panel {name}: component {c} has {n} types (needs exactly one)"
                    )));
                }
            }
        }
        for (category, list) in &raw.getmeas {
            if let Some(t) = list.iter().find(|t| !types.contains_key(t)) {
                return Err(TableError(format!(
                    "category {category} asks for type {t}, which [types] does not describe"
                )));
            }
        }
        for (category, rule) in &raw.intraday {
            if [&rule.field, &rule.data_type, &rule.unit, &rule.id]
                .iter()
                .any(|t| t.trim().is_empty())
            {
                return Err(TableError(format!("intraday {category}: empty field")));
            }
            if raw.getmeas.contains_key(category) {
                return Err(TableError(format!(
                    "category {category} is both a getmeas and an intraday category"
                )));
            }
        }
        for (category, rule) in &raw.daily {
            if [&rule.field, &rule.data_type, &rule.unit, &rule.id]
                .iter()
                .any(|t| t.trim().is_empty())
            {
                return Err(TableError(format!("daily {category}: empty field")));
            }
            if raw.getmeas.contains_key(category) || raw.intraday.contains_key(category) {
                return Err(TableError(format!(
                    "category {category} is fetched by two endpoints"
                )));
            }
        }
        let sleep = raw.sleep.unwrap_or_default();
        for (data_type, rule) in &sleep.types {
            let bad_part = rule.parts.iter().any(|p| {
                p.component.trim().is_empty()
                    || p.field.trim().is_empty()
                    || p.unit.trim().is_empty()
                    || !(p.divisor.is_finite() && p.divisor > 0.0)
            });
            if rule.parts.first().is_none_or(|p| p.component != "value") || bad_part {
                return Err(TableError(format!(
                    "sleep {data_type}: the first part is the value, every part complete"
                )));
            }
        }
        if let Some(h) = &sleep.hypnogram
            && (h.data_type.trim().is_empty()
                || h.id.trim().is_empty()
                || h.epoch_seconds == 0
                || h.code_map.trim().is_empty()
                || h.states.keys().any(|k| k.parse::<i64>().is_err())
                || h.averages.values().any(|a| {
                    [&a.field, &a.unit, &a.id]
                        .iter()
                        .any(|t| t.trim().is_empty())
                }))
        {
            return Err(TableError(
                "sleep.hypnogram: every field set, states keyed by integers".into(),
            ));
        }
        let fetched_by = |c: &str| {
            usize::from(raw.getmeas.contains_key(c))
                + usize::from(raw.intraday.contains_key(c))
                + usize::from(raw.daily.contains_key(c))
                + usize::from(!sleep.types.is_empty() && sleep.category == c)
                + usize::from(raw.devices.as_ref().is_some_and(|d| d.category == c))
                + usize::from(raw.heart.as_ref().is_some_and(|h| h.category == c))
        };
        if let Some(heart) = &raw.heart {
            let keys_ok = heart.rhythm.keys().all(|k| k.parse::<i64>().is_ok())
                && heart.models.keys().all(|k| k.parse::<i64>().is_ok());
            if [&heart.category, &heart.data_type, &heart.id, &heart.unit]
                .iter()
                .any(|t| t.trim().is_empty())
                || heart.rhythm.is_empty()
                || !keys_ok
            {
                return Err(TableError(
                    "heart: every field set, rhythm and models keyed by integers".into(),
                ));
            }
        }
        let mut notify = BTreeMap::new();
        for (k, categories) in raw.notify {
            let appli = int_key("notify", &k)?;
            for c in &categories {
                if fetched_by(c) != 1 {
                    return Err(TableError(format!(
                        "notification {appli} names category {c}, which nothing fetches"
                    )));
                }
            }
            notify.insert(appli, categories);
        }
        Ok(Self {
            notify,
            getmeas: raw.getmeas,
            intraday: raw.intraday,
            daily: raw.daily,
            sleep,
            devices: raw.devices,
            heart: raw.heart,
            panels: raw.panels,
            types,
        })
    }

    /// The notification categories a connected user is subscribed to: every category with
    /// data to fetch, and the user-profile category 46 (an unlink ends the link).
    #[must_use]
    pub fn subscriptions(&self) -> Vec<i32> {
        let mut applis: Vec<i32> = self.notify.keys().copied().collect();
        if !applis.contains(&APPLI_USER) {
            applis.push(APPLI_USER);
        }
        applis.sort_unstable();
        applis
    }

    /// The fetch categories of a notification category (empty: nothing to fetch).
    #[must_use]
    pub fn categories_of(&self, appli: i32) -> &[String] {
        self.notify.get(&appli).map_or(&[], Vec::as_slice)
    }

    /// Every fetch category.
    #[must_use]
    pub fn categories(&self) -> BTreeSet<&str> {
        self.getmeas
            .keys()
            .chain(self.intraday.keys())
            .chain(self.daily.keys())
            .map(String::as_str)
            .chain((!self.sleep.types.is_empty()).then_some(self.sleep.category.as_str()))
            .chain(self.devices.as_ref().map(|d| d.category.as_str()))
            .chain(self.heart.as_ref().map(|h| h.category.as_str()))
            .collect()
    }

    /// The `getmeas` types to ask for the given fetch categories, sorted, without repeats,
    /// keeping only types whose data type `allowed` accepts.
    #[must_use]
    pub fn meastypes<'a>(
        &self,
        categories: impl IntoIterator<Item = &'a str>,
        allowed: impl Fn(&str) -> bool,
    ) -> Vec<i32> {
        let set: BTreeSet<i32> = categories
            .into_iter()
            .filter_map(|c| self.getmeas.get(c))
            .flatten()
            .copied()
            .filter(|t| self.types.get(t).is_some_and(|r| allowed(&r.data_type)))
            .collect();
        set.into_iter().collect()
    }

    /// Whether `allowed` accepts the data type of every measure type of the table.
    #[must_use]
    pub fn all_types_allowed(&self, allowed: impl Fn(&str) -> bool) -> bool {
        self.types.values().all(|r| allowed(&r.data_type))
    }

    /// Whether a fetch category is answered by `getmeas`.
    #[must_use]
    pub fn is_getmeas(&self, category: &str) -> bool {
        self.getmeas.contains_key(category)
    }

    /// The intraday rule of a fetch category, if it is an intraday one.
    #[must_use]
    pub fn intraday(&self, category: &str) -> Option<&IntradayRule> {
        self.intraday.get(category)
    }

    /// The daily rule of a fetch category, if it is a `getactivity` one.
    #[must_use]
    pub fn daily(&self, category: &str) -> Option<&DailyRule> {
        self.daily.get(category)
    }

    /// The sleep summary's data types, if `category` is the sleep category.
    #[must_use]
    pub fn sleep(&self, category: &str) -> Option<&BTreeMap<String, SleepRule>> {
        (self.sleep.category == category && !self.sleep.types.is_empty())
            .then_some(&self.sleep.types)
    }

    /// The hypnogram rule, if `category` is the sleep category and the table has one.
    #[must_use]
    pub fn hypnogram(&self, category: &str) -> Option<&HypnogramRule> {
        self.sleep
            .hypnogram
            .as_ref()
            .filter(|_| self.sleep.category == category)
    }

    /// Whether `category` is the one that lists the user's devices.
    #[must_use]
    pub fn is_devices(&self, category: &str) -> bool {
        self.devices
            .as_ref()
            .is_some_and(|d| d.category == category)
    }

    /// The ECG rule, if `category` is the one that reads the recordings.
    #[must_use]
    pub fn heart(&self, category: &str) -> Option<&HeartRule> {
        self.heart.as_ref().filter(|h| h.category == category)
    }

    /// What measure type `t` becomes.
    #[must_use]
    pub fn rule(&self, t: i32) -> Option<&TypeRule> {
        self.types.get(&t)
    }

    /// The panel of a data type, if it is one.
    #[must_use]
    pub fn panel(&self, data_type: &str) -> Option<&Panel> {
        self.panels.get(data_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_builtin_table_loads() {
        let t = MeasureTable::builtin().unwrap();
        assert_eq!(t.categories_of(1), ["body"]);
        assert_eq!(t.categories_of(4), ["blood_pressure"]);
        assert!(t.categories_of(46).is_empty());
        let all = |_: &str| true;
        assert_eq!(t.meastypes(["blood_pressure"], all), vec![9, 10, 11, 54]);
        // a weigh-in brings the scale's pulse
        assert!(t.meastypes(["body"], all).contains(&11));
        // one list, no repeats, for several categories
        let both = t.meastypes(["body", "blood_pressure"], all);
        assert_eq!(both.iter().filter(|x| **x == 11).count(), 1);
        assert_eq!(t.intraday("heart_rate").unwrap().field, "heart_rate");
        assert_eq!(t.intraday("spo2").unwrap().field, "spo2_auto");
        assert!(t.intraday("steps").unwrap().zero_is_value);
        assert_eq!(
            t.categories_of(16),
            [
                "heart_rate",
                "steps",
                "spo2",
                "hrv_sdnn",
                "hrv_rmssd",
                "daily_steps"
            ]
        );
        assert_eq!(t.intraday("hrv_sdnn").unwrap().field, "sdnn1");
        assert_eq!(t.daily("daily_steps").unwrap().unit, "/d");
        let sleep = t.sleep("sleep").unwrap();
        assert_eq!(sleep["sleep_duration"].parts[0].field, "total_sleep_time");
        assert_eq!(t.categories_of(44), ["sleep"]);
        assert!(t.categories().contains("sleep"));
        assert!(t.is_devices("devices") && t.categories().contains("devices"));
        assert_eq!(t.rule(4).unwrap().shift, 2);
        assert_eq!(t.panel("blood_pressure").unwrap().id, "bp");
    }

    #[test]
    fn test_types_of_a_data_type_not_allowed_are_not_asked_for() {
        let t = MeasureTable::builtin().unwrap();
        let no_pulse = t.meastypes(["blood_pressure"], |d| d != "heart_rate");
        assert_eq!(no_pulse, vec![9, 10, 54]);
        let no_bp = t.meastypes(["blood_pressure"], |d| d != "blood_pressure");
        assert_eq!(no_bp, vec![11, 54]);
        assert!(t.meastypes(["body"], |_| false).is_empty());
    }

    #[test]
    fn test_all_types_allowed_only_when_no_data_type_is_refused() {
        let t = MeasureTable::builtin().unwrap();
        assert!(t.all_types_allowed(|_| true));
        assert!(!t.all_types_allowed(|d| d != "bone_mass"));
    }

    #[test]
    fn test_every_documented_measure_type_of_the_issue_is_described() {
        let t = MeasureTable::builtin().unwrap();
        for (ty, data_type) in [
            (1, "body_weight"),
            (4, "body_height"),
            (5, "fat_free_mass"),
            (6, "body_fat_percentage"),
            (8, "fat_mass"),
            (11, "heart_rate"),
            (12, "body_temperature"),
            (54, "oxygen_saturation"),
            (71, "body_temperature"),
            (73, "skin_temperature"),
            (76, "muscle_mass"),
            (77, "body_water_mass"),
            (88, "bone_mass"),
            (91, "pulse_wave_velocity"),
            (135, "qrs_duration"),
            (136, "pr_interval"),
            (137, "qt_interval"),
            (138, "qtc_interval"),
        ] {
            assert_eq!(
                t.rule(ty).map(|r| r.data_type.as_str()),
                Some(data_type),
                "{ty}"
            );
        }
    }

    #[test]
    fn test_inconsistent_tables_are_refused() {
        let base = "format = 1\n[intraday]\n";
        let valid = "[notify]\n1 = [\"c\"]\n[getmeas]\nc = [9, 10]\n[types]\n\
            9 = { data_type = \"bp2\", component = \"a\", unit = \"u\" }\n\
            10 = { data_type = \"bp2\", component = \"b\", unit = \"u\" }\n\
            [panels.bp2]\ncomponents = [\"a\", \"b\"]\nid = \"x\"\n";
        assert!(MeasureTable::from_toml(&format!("{base}{valid}")).is_ok());
        let cases = [
            // a category asks for an undescribed type
            "[notify]\n[getmeas]\nc = [7]\n[types]\n",
            // a notification names a category nothing fetches
            "[notify]\n1 = [\"nope\"]\n[getmeas]\n[types]\n",
            // a panel component without a type
            "[notify]\n[getmeas]\n[types]\n9 = { data_type = \"bp2\", component = \"a\", unit = \"u\" }\n\
             [panels.bp2]\ncomponents = [\"a\", \"b\"]\nid = \"x\"\n",
            // a component outside a panel
            "[notify]\n[getmeas]\n[types]\n9 = { data_type = \"w\", component = \"a\", unit = \"u\" }\n",
            // an empty unit
            "[notify]\n[getmeas]\n[types]\n9 = { data_type = \"w\", unit = \" \" }\n",
            // a type number that is not a number
            "[notify]\n[getmeas]\n[types]\nx = { data_type = \"w\", unit = \"u\" }\n",
        ];
        for case in cases {
            assert!(
                MeasureTable::from_toml(&format!("{base}{case}")).is_err(),
                "{case}"
            );
        }
    }
}
