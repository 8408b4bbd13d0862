//! Beurer (`providers.md` §4): no cloud API. Patients export a CSV from the HealthManager Pro
//! app and a clinic uploads it; [`parse_export`] turns the file into ohx [`Measurement`]s.
//! Pure: no I/O, no logging, no clock.
//!
//! # The file
//!
//! Semicolon-separated, double-quoted fields with `""` escapes (a quoted field may span lines),
//! numbers sometimes unquoted with extra precision (`59.54000091552734`). Sections ("User
//! details", "Period", "Category", a title line such as "Weight") precede each table; they are
//! skipped. A table is recognized by its header: a line whose first two cells are the Date and
//! Time labels of an app language, followed by the columns of one table of `tables.toml`
//! (weight, blood pressure; English and German). A blank line or a one-cell line (a section
//! title) ends a table; a file may hold several. UTF-8 only, with or without a byte order mark
//! (the app writes UTF-8; a Windows-1252 or UTF-16 file is refused, naming the line of the first
//! byte that is not UTF-8, instead of being guessed at).
//!
//! What each column becomes (data type, component, UCUM unit, sanity bounds), every header
//! spelling and the languages are data in `tables.toml` ([`Tables`]): a new locale is a table
//! edit. Values keep the decimal places as written, up to 3; more
//! places are the app's float formatting (`59.54000091552734`, `62.500000`), so such a value is
//! the shortest decimal of the same 32-bit float (59.54, 62.5).
//! Medication and Comment are free text: never read into a record, a hash, a reason or a log.
//!
//! # Time
//!
//! Date and Time are naive local time; the caller supplies the patient's IANA zone.
//! `effective_start` is that local minute in the zone (UTC epoch ms), `utc_offset_seconds` the
//! zone's offset at that instant. A local time that does not exist (the spring-forward gap) or
//! exists twice (the autumn overlap) is resolved with jiff's "compatible" disambiguation, as
//! RFC 5545 and `java.time` do: a gap time moves forward by the gap's length (02:30 in Berlin's
//! gap → 03:30 CEST), an overlap time takes the earlier instant (02:30 CEST, not CET); the row is
//! imported either way.
//!
//! # Identity
//!
//! Beurer exposes no ids, so a row's identity is its content:
//! `row_id` = the first 32 hex digits of SHA-256 over
//! `{table}|{local date}|{local time}|{cell}|…|{cell}|{zone}`, where `table` is the table kind
//! with the unit its header chose (`weight[kg]`, `weight[lb]`, `blood_pressure`), the date is
//! ISO (`2022-02-01`, whatever the file's format), the time `HH:MM`, the cells are the value and
//! flag cells in `tables.toml` order (numbers trimmed with a decimal comma made a point, flags
//! `1`/`0`, an empty or absent cell empty; free text is not part of it), and `zone` the IANA
//! name. The same reading therefore has the same identity in an English and a German export,
//! importing a file twice gives identical records, and an edited value is a new identity.
//! Each Measurement of the row: `measurement_id = beurer:{provider_user_id}:{row_id}:{data_type}`,
//! `provider_group_id = row_id`. A second identical row in one file is rejected as
//! `duplicate row` (rows with the same time and different values are both imported).
//!
//! # Failures
//!
//! A malformed file (not UTF-8, no recognized table, a table header with an unknown, missing or
//! repeated column, an unknown time zone) is an [`ExportError`]. A bad row never fails the file:
//! it becomes a [`RejectedRow`] whose reason names the column and the problem, never the value.

pub mod csv;

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use ohx_common::records::Measurement;

pub use csv::{parse_export, parse_export_with};

/// The name of the provider in records and routes.
pub const NAME: &str = "beurer";

/// The export tables compiled into the binary.
pub const BUILTIN: &str = include_str!("tables.toml");

/// One row turned into Measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedRow {
    /// 1-based line in the file.
    pub line: usize,
    /// The row's content identity (see the module documentation).
    pub row_id: String,
    /// One per data type with a value in the row, in `tables.toml` order.
    pub measurements: Vec<Measurement>,
}

/// A row that was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRow {
    /// 1-based line in the file.
    pub line: usize,
    /// Names the column and the problem, never the value.
    pub reason: String,
}

/// What a file held.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedExport {
    /// Recognized tables as `{kind}/{locale}` (e.g. `weight/en`), in file order, each once.
    pub tables: Vec<String>,
    /// In file order.
    pub imported: Vec<ImportedRow>,
    /// In file order.
    pub rejected: Vec<RejectedRow>,
}

/// A file that cannot be imported at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The bytes are not UTF-8 (a byte order mark is allowed); `line` holds the first invalid
    /// byte.
    #[error(
        "line {line}: the file is not UTF-8 text (export it again; only UTF-8 is accepted, with or without a byte order mark)"
    )]
    NotUtf8 { line: usize },
    /// No line is the header of a known table.
    #[error(
        "no recognized table: no line is a weight or blood pressure table header of a known app language"
    )]
    NoTable,
    /// A table header (a line starting with a language's Date and Time labels) has a column no
    /// table of that language knows.
    #[error("line {line}: unknown column {column:?} in a table header")]
    UnknownColumn { line: usize, column: String },
    /// A table header names a column twice.
    #[error("line {line}: column {column:?} appears twice in the table header")]
    DuplicateColumn { line: usize, column: String },
    /// A table header lacks a column its table needs.
    #[error("line {line}: the {table} table header lacks column {column:?}")]
    MissingColumn {
        line: usize,
        table: String,
        column: String,
    },
    /// The caller's time zone is not an IANA zone of the tz database.
    #[error("unknown time zone {zone:?}")]
    UnknownTimeZone { zone: String },
    /// The compiled-in tables are inconsistent (a unit test keeps this from shipping).
    #[error(transparent)]
    Table(#[from] TableError),
}

/// Why export tables were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("beurer export table: {0}")]
pub struct TableError(pub String);

/// A unit a header label names (`kg`, `lb`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    /// UCUM code.
    pub ucum: String,
    /// Converts a value in this unit to the unit of the bounds (kg).
    pub to_bounds: f64,
}

/// An app language.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locale {
    /// The Date column's label.
    pub date: String,
    /// The Time column's label.
    pub time: String,
    /// Whether numbers may use a decimal comma.
    #[serde(default)]
    pub decimal_comma: bool,
}

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnKind {
    /// A number: a component of the row's Measurement of its data type.
    #[default]
    Value,
    /// Yes/no: a 1/0 component of its data type's Measurement.
    Flag,
    /// Free text, never read.
    FreeText,
}

/// Where a value column's unit comes from, when not fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitFrom {
    /// The column's header label is the unit (a key of `[units]`).
    Label,
    /// The unit the table's label column chose.
    Table,
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    /// Locale → header spellings (case-insensitive).
    pub labels: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub kind: ColumnKind,
    #[serde(default)]
    pub data_type: Option<String>,
    #[serde(default = "value_component")]
    pub component: String,
    /// Fixed UCUM unit.
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub unit_from: Option<UnitFrom>,
    /// Inclusive sanity bounds (in kg for units of `[units]`).
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// The header may lack it (flags and free text only).
    #[serde(default)]
    pub optional: bool,
}

fn value_component() -> String {
    "value".to_owned()
}

/// One table kind.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// The columns after Date and Time, in the order their cells are hashed.
    pub columns: Vec<Column>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    format: u32,
    date_formats: Vec<String>,
    time_formats: Vec<String>,
    yes: Vec<String>,
    no: Vec<String>,
    #[serde(default)]
    units: BTreeMap<String, Unit>,
    locales: BTreeMap<String, Locale>,
    tables: BTreeMap<String, Table>,
}

/// The checked export tables (`tables.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tables {
    date_formats: Vec<String>,
    time_formats: Vec<String>,
    /// Lower case.
    yes: Vec<String>,
    /// Lower case.
    no: Vec<String>,
    units: BTreeMap<String, Unit>,
    locales: BTreeMap<String, Locale>,
    tables: BTreeMap<String, Table>,
}

static BUILTIN_TABLES: LazyLock<Result<Tables, TableError>> =
    LazyLock::new(|| Tables::from_toml(BUILTIN));

/// Header labels and cell words compare trimmed and case-insensitively.
fn same(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

impl Tables {
    /// The tables compiled into the binary, loaded and checked once.
    ///
    /// # Errors
    /// When the compiled-in table is inconsistent (a test keeps it from shipping so).
    pub fn builtin() -> Result<&'static Self, TableError> {
        BUILTIN_TABLES.as_ref().map_err(Clone::clone)
    }

    /// Parses and checks tables: date and time formats read back what they write, every
    /// column is labelled in every locale and a label is used once per table and locale, value
    /// columns have a data type, one unit and bounds, flags ride on a data type with values,
    /// free text carries nothing else.
    ///
    /// # Errors
    /// The first inconsistency found.
    pub fn from_toml(text: &str) -> Result<Self, TableError> {
        let raw: Raw = toml::from_str(text).map_err(|e| TableError(e.to_string()))?;
        if raw.format != 1 {
            return Err(TableError(format!("unknown format {}", raw.format)));
        }
        let tables = Self {
            date_formats: raw.date_formats,
            time_formats: raw.time_formats,
            yes: raw.yes.iter().map(|w| w.trim().to_lowercase()).collect(),
            no: raw.no.iter().map(|w| w.trim().to_lowercase()).collect(),
            units: raw.units,
            locales: raw.locales,
            tables: raw.tables,
        };
        tables.check_formats()?;
        tables.check_words_units_locales()?;
        if tables.tables.is_empty() {
            return Err(TableError("no table".into()));
        }
        for (name, table) in &tables.tables {
            tables.check_table(name, table)?;
        }
        Ok(tables)
    }

    fn check_formats(&self) -> Result<(), TableError> {
        let (Ok(date), Ok(time)) = (
            jiff::civil::Date::new(2022, 2, 1),
            jiff::civil::Time::new(9, 26, 0, 0),
        ) else {
            return Err(TableError("sample date".into()));
        };
        if self.date_formats.is_empty() || self.time_formats.is_empty() {
            return Err(TableError("no date or time format".into()));
        }
        for f in &self.date_formats {
            let written = jiff::fmt::strtime::format(f.as_str(), date)
                .map_err(|e| TableError(format!("date format {f:?} cannot write a date: {e}")))?;
            if csv::parse_date(self, &written) != Some(date) {
                return Err(TableError(format!(
                    "date format {f:?} does not read back what it writes"
                )));
            }
        }
        for f in &self.time_formats {
            let written = jiff::fmt::strtime::format(f.as_str(), time)
                .map_err(|e| TableError(format!("time format {f:?} cannot write a time: {e}")))?;
            if csv::parse_time(self, &written) != Some(time) {
                return Err(TableError(format!(
                    "time format {f:?} does not read back what it writes"
                )));
            }
        }
        Ok(())
    }

    fn check_words_units_locales(&self) -> Result<(), TableError> {
        if self.yes.is_empty()
            || self.no.is_empty()
            || self.yes.iter().chain(&self.no).any(String::is_empty)
            || self.yes.iter().any(|w| self.no.contains(w))
        {
            return Err(TableError(
                "yes and no need words, none empty, none in both".into(),
            ));
        }
        for (label, unit) in &self.units {
            if unit.ucum.trim().is_empty() || !(unit.to_bounds.is_finite() && unit.to_bounds > 0.0)
            {
                return Err(TableError(format!(
                    "unit {label}: empty UCUM code or bad factor"
                )));
            }
        }
        if self.locales.is_empty() {
            return Err(TableError("no locale".into()));
        }
        for (name, locale) in &self.locales {
            if name.is_empty()
                || name.contains(['/', '|'])
                || locale.date.trim().is_empty()
                || locale.time.trim().is_empty()
                || same(&locale.date, &locale.time)
            {
                return Err(TableError(format!(
                    "locale {name:?}: needs a name and distinct Date and Time labels"
                )));
            }
        }
        Ok(())
    }

    fn check_table(&self, name: &str, table: &Table) -> Result<(), TableError> {
        let fail = |what: String| Err(TableError(format!("table {name}: {what}")));
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return fail("the name is lower-case letters and _".into());
        }
        if table.columns.is_empty() {
            return fail("no column".into());
        }
        let label_columns = table
            .columns
            .iter()
            .filter(|c| c.unit_from == Some(UnitFrom::Label))
            .count();
        if label_columns > 1 {
            return fail("more than one column with unit_from = \"label\"".into());
        }
        let mut components = BTreeSet::new();
        for (i, c) in table.columns.iter().enumerate() {
            let at = format!("column {}", i + 1);
            let locales: Vec<&String> = c.labels.keys().collect();
            if locales != self.locales.keys().collect::<Vec<_>>() {
                return fail(format!("{at}: needs labels for exactly the locales"));
            }
            if c.labels.values().flatten().any(|l| l.trim().is_empty())
                || c.labels.values().any(Vec::is_empty)
            {
                return fail(format!("{at}: an empty label"));
            }
            let data_type = c.data_type.as_deref().map(str::trim);
            let bounded = matches!((c.min, c.max), (Some(lo), Some(hi)) if lo.is_finite() && hi.is_finite() && lo <= hi);
            let unit_ok = c.unit.as_deref().is_some_and(|u| !u.trim().is_empty());
            let ok = match c.kind {
                ColumnKind::Value => {
                    data_type.is_some_and(|d| !d.is_empty())
                        && unit_ok != c.unit_from.is_some()
                        && bounded
                        && !c.optional
                }
                ColumnKind::Flag => {
                    data_type.is_some_and(|d| !d.is_empty())
                        && unit_ok
                        && c.unit_from.is_none()
                        && c.min.is_none()
                        && c.max.is_none()
                }
                ColumnKind::FreeText => {
                    data_type.is_none()
                        && c.unit.is_none()
                        && c.unit_from.is_none()
                        && c.min.is_none()
                        && c.max.is_none()
                }
            };
            if !ok || c.component.trim().is_empty() {
                return fail(format!(
                    "{at}: a value needs a data type, one unit (unit or unit_from) and bounds, and \
                     is not optional; a flag a data type and a unit; free text nothing else"
                ));
            }
            match c.unit_from {
                Some(UnitFrom::Label) => {
                    if let Some(l) = c
                        .labels
                        .values()
                        .flatten()
                        .find(|l| !self.units.contains_key(l.trim()))
                    {
                        return fail(format!("{at}: label {l:?} is not a unit of [units]"));
                    }
                }
                Some(UnitFrom::Table) if label_columns == 0 => {
                    return fail(format!(
                        "{at}: unit_from = \"table\" without a label column"
                    ));
                }
                _ => {}
            }
            if let Some(d) = data_type
                && !components.insert((d.to_owned(), c.component.clone()))
            {
                return fail(format!("{at}: component {} of {d} twice", c.component));
            }
            if c.kind == ColumnKind::Flag
                && !table.columns.iter().any(|v| {
                    v.kind == ColumnKind::Value
                        && v.data_type.as_deref().map(str::trim) == data_type
                })
            {
                return fail(format!("{at}: a flag of a data type without values"));
            }
        }
        for (locale_name, locale) in &self.locales {
            let mut seen: Vec<String> = vec![
                locale.date.trim().to_lowercase(),
                locale.time.trim().to_lowercase(),
            ];
            for l in table
                .columns
                .iter()
                .filter_map(|c| c.labels.get(locale_name))
                .flatten()
            {
                let l = l.trim().to_lowercase();
                if seen.contains(&l) {
                    return fail(format!("label {l:?} used twice in locale {locale_name}"));
                }
                seen.push(l);
            }
        }
        Ok(())
    }

    /// The table kinds, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// The locales, sorted.
    pub fn locales(&self) -> impl Iterator<Item = &str> {
        self.locales.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_builtin_tables_load() {
        let t = Tables::builtin().unwrap();
        assert_eq!(t.kinds().collect::<Vec<_>>(), ["blood_pressure", "weight"]);
        assert_eq!(t.locales().collect::<Vec<_>>(), ["de", "en"]);
        let weight = &t.tables["weight"];
        let data_types: Vec<_> = weight
            .columns
            .iter()
            .filter_map(|c| c.data_type.as_deref())
            .collect();
        assert_eq!(
            data_types,
            [
                "body_weight",
                "body_mass_index",
                "body_fat_percentage",
                "body_water_percentage",
                "muscle_percentage",
                "bone_mass"
            ]
        );
        assert_eq!(t.units["lb"].ucum, "[lb_av]");
        assert!(t.locales["de"].decimal_comma && !t.locales["en"].decimal_comma);
    }

    #[test]
    fn test_inconsistent_tables_are_refused() {
        let base = BUILTIN;
        let valid = Tables::from_toml(base);
        assert!(valid.is_ok(), "{valid:?}");
        let cases = [
            // an ambiguous date format that cannot read back what it writes
            (
                "date_formats = [\"%Y-%m-%d\", \"%d.%m.%Y\"]",
                "date_formats = [\"%H\"]",
            ),
            // a time format without minutes
            (
                "time_formats = [\"%H:%M\", \"%-H:%M\"]",
                "time_formats = [\"%Y\"]",
            ),
            // a word that is yes and no
            ("no = [\"no\", \"nein\", \"0\"]", "no = [\"no\", \"ja\"]"),
            // a column without a German label
            (
                "labels = { en = [\"BMI\"], de = [\"BMI\"] }",
                "labels = { en = [\"BMI\"] }",
            ),
            // a label twice in one locale
            (
                "labels = { en = [\"Water\"], de = [\"Wasser\"] }",
                "labels = { en = [\"Water\"], de = [\"Körperfett\"] }",
            ),
            // a value without bounds
            ("min = 5\nmax = 150\n", ""),
            // a unit label that is not a unit
            (
                "labels = { en = [\"kg\", \"lb\"], de = [\"kg\", \"lb\"] }",
                "labels = { en = [\"kg\", \"st\"], de = [\"kg\", \"lb\"] }",
            ),
            // a second component of one data type
            ("component = \"diastolic\"", "component = \"systolic\""),
            // an unknown key
            ("decimal_comma = false", "decimal_point = true"),
        ];
        for (from, to) in cases {
            assert!(base.contains(from), "{from}");
            let edited = base.replacen(from, to, 1);
            assert!(Tables::from_toml(&edited).is_err(), "{to}");
        }
    }

    #[test]
    fn test_a_new_locale_is_a_table_edit() {
        // French: every column gains a spelling, and a locale entry.
        let mut text = BUILTIN
            .replace(
                "de = [\"kg\", \"lb\"]",
                "fr = [\"kg\", \"lb\"], de = [\"kg\", \"lb\"]",
            )
            .replace("en = [\"", "fr = [\"__FR__\"], en = [\"")
            .replace("fr = [\"__FR__\"], en = [\"kg", "en = [\"kg");
        text.push_str("\n[locales.fr]\ndate = \"Date\"\ntime = \"Heure\"\ndecimal_comma = true\n");
        // Give each French label a distinct spelling per table.
        let mut n = 0;
        while let Some(at) = text.find("__FR__") {
            n += 1;
            text.replace_range(at..at + 6, &format!("fr{n}"));
        }
        let t = Tables::from_toml(&text).unwrap();
        assert_eq!(t.locales().collect::<Vec<_>>(), ["de", "en", "fr"]);
    }

    #[test]
    fn test_errors_name_the_line() {
        let e = ExportError::UnknownColumn {
            line: 7,
            column: "Puls".into(),
        };
        assert!(e.to_string().starts_with("line 7: "), "{e}");
        assert!(
            ExportError::NotUtf8 { line: 1 }
                .to_string()
                .starts_with("line 1: ")
        );
    }
}
