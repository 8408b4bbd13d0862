//! The HealthManager Pro CSV export → [`ParsedExport`] (see the [module documentation](super)).
//!
//! A small hand-written record reader ([`Records`]): `;` separates fields, a field may be
//! double-quoted with `""` for a quote, a quoted field may span lines, `\r\n` ends a line like
//! `\n`. A record whose quoting is broken (text after a closing quote, a quote never closed) is
//! one malformed record covering its first line only, so a stray quote never swallows the rows
//! after it.

use std::collections::HashMap;

use jiff::civil::{Date, Time};
use jiff::fmt::strtime;
use jiff::tz::TimeZone;
use ohx_common::records::{AGGREGATION_INDIVIDUAL, Component, Context, Measurement, series_key};
use sha2::{Digest, Sha256};

use super::{
    Column, ColumnKind, ExportError, ImportedRow, NAME, ParsedExport, RejectedRow, Tables, Unit,
    UnitFrom,
};

/// Hex digits of SHA-256 kept in a row id (128 bits).
const ROW_ID_HEX_DIGITS: usize = 32;

/// Longest header label or zone name quoted in an error.
const MAX_QUOTED: usize = 40;

/// Parses a HealthManager Pro export with the built-in tables. `ctx` is the record context
/// (`provider` should be [`NAME`]; `provider_user_id` is part of every `measurement_id`);
/// `time_zone` is the patient's IANA zone, in which the file's naive local times are read.
///
/// # Errors
/// A malformed file or an unknown time zone ([`ExportError`]); bad rows are
/// [`RejectedRow`]s, never errors.
pub fn parse_export(
    bytes: &[u8],
    ctx: &Context,
    time_zone: &str,
) -> Result<ParsedExport, ExportError> {
    parse_export_with(Tables::builtin()?, bytes, ctx, time_zone)
}

/// [`parse_export`] with other tables (e.g. a locale being added).
///
/// # Errors
/// As [`parse_export`].
pub fn parse_export_with(
    tables: &Tables,
    bytes: &[u8],
    ctx: &Context,
    time_zone: &str,
) -> Result<ParsedExport, ExportError> {
    let tz = TimeZone::get(time_zone).map_err(|_| ExportError::UnknownTimeZone {
        zone: clip(time_zone),
    })?;
    let zone = tz.iana_name().unwrap_or(time_zone).to_owned();
    let text = decode(bytes)?;

    let mut out = ParsedExport::default();
    let mut current: Option<Layout<'_>> = None;
    let mut first_line_of: HashMap<String, usize> = HashMap::new();
    for record in Records::new(text) {
        let line = record.line;
        let fields = match record.fields {
            Ok(fields) => fields,
            Err(malformed) => {
                // Outside a table (the preamble) a broken line is skipped like any other.
                if current.is_some() {
                    out.rejected.push(RejectedRow {
                        line,
                        reason: malformed.reason().to_owned(),
                    });
                }
                continue;
            }
        };
        if fields.iter().all(|f| f.trim().is_empty()) {
            current = None;
            continue;
        }
        if let Some(layout) = match_header(tables, &fields, line)? {
            let kind = format!("{}/{}", layout.table, layout.locale);
            if !out.tables.contains(&kind) {
                out.tables.push(kind);
            }
            current = Some(layout);
            continue;
        }
        let Some(layout) = current.as_ref() else {
            // A data row with no header above it: reported, never dropped silently.
            if fields.len() >= 2
                && fields
                    .first()
                    .is_some_and(|d| parse_date(tables, d).is_some())
            {
                out.rejected.push(RejectedRow {
                    line,
                    reason: "row outside a recognized table (no table header above it)".into(),
                });
            }
            continue;
        };
        if fields.len() == 1 {
            // A section title ("Blood pressure") ends the table.
            current = None;
            continue;
        }
        match parse_row(tables, layout, &fields, &tz, &zone, ctx) {
            Ok((row_id, measurements)) => match first_line_of.get(&row_id) {
                Some(first) => out.rejected.push(RejectedRow {
                    line,
                    reason: format!("duplicate row (same as line {first})"),
                }),
                None => {
                    first_line_of.insert(row_id.clone(), line);
                    out.imported.push(ImportedRow {
                        line,
                        row_id,
                        measurements,
                    });
                }
            },
            Err(reason) => out.rejected.push(RejectedRow { line, reason }),
        }
    }
    if out.tables.is_empty() {
        return Err(ExportError::NoTable);
    }
    Ok(out)
}

/// The text of the file: UTF-8, a leading byte order mark dropped.
fn decode(bytes: &[u8]) -> Result<&str, ExportError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| ExportError::NotUtf8 {
        line: 1 + bytes
            .iter()
            .take(e.valid_up_to())
            .filter(|b| **b == b'\n')
            .count(),
    })
}

/// At most [`MAX_QUOTED`] characters of a label or name for an error text.
fn clip(s: &str) -> String {
    s.trim().chars().take(MAX_QUOTED).collect()
}

/// Why a record could not be split into fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Characters between a closing quote and the next `;` or line end.
    TextAfterQuote,
    /// A quoted field never closed.
    Unterminated,
}

impl Malformed {
    fn reason(self) -> &'static str {
        match self {
            Self::TextAfterQuote => "malformed quoting: text after a closing quote",
            Self::Unterminated => "malformed quoting: a quoted field is never closed",
        }
    }
}

/// One record of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line the record starts on.
    pub line: usize,
    /// The fields, unquoted (not trimmed).
    pub fields: Result<Vec<String>, Malformed>,
}

/// The records of a text, in order.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> Records<'a> {
    /// Records of `text`, the first on line 1.
    #[must_use]
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            pos: 0,
            line: 1,
        }
    }
}

/// The index of the first byte from `from` that `hit` accepts.
fn find(bytes: &[u8], from: usize, hit: impl Fn(u8) -> bool) -> Option<usize> {
    bytes
        .get(from..)?
        .iter()
        .position(|b| hit(*b))
        .map(|k| from + k)
}

fn newlines(bytes: &[u8], from: usize, to: usize) -> usize {
    bytes
        .get(from..to)
        .map_or(0, |s| s.iter().filter(|b| **b == b'\n').count())
}

impl Iterator for Records<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        // Delimiters and quotes are ASCII, never part of a multi-byte UTF-8 sequence, so byte
        // positions found here are character boundaries.
        let text = self.text;
        let bytes = text.as_bytes();
        let start = self.pos;
        if start >= bytes.len() {
            return None;
        }
        let line = self.line;
        let mut fields = Vec::new();
        let mut i = start;
        let outcome: Result<usize, Malformed> = loop {
            if bytes.get(i) == Some(&b'"') {
                let mut value = String::new();
                let mut j = i + 1;
                let closed = loop {
                    let Some(k) = find(bytes, j, |b| b == b'"') else {
                        break None;
                    };
                    value.push_str(text.get(j..k).unwrap_or_default());
                    if bytes.get(k + 1) == Some(&b'"') {
                        value.push('"');
                        j = k + 2;
                    } else {
                        break Some(k + 1);
                    }
                };
                let Some(after) = closed else {
                    break Err(Malformed::Unterminated);
                };
                fields.push(value);
                match bytes.get(after) {
                    Some(b';') => i = after + 1,
                    None => break Ok(after),
                    Some(b'\n') => break Ok(after + 1),
                    Some(b'\r') if bytes.get(after + 1) == Some(&b'\n') => break Ok(after + 2),
                    Some(_) => break Err(Malformed::TextAfterQuote),
                }
            } else {
                let k = find(bytes, i, |b| b == b';' || b == b'\n').unwrap_or(bytes.len());
                let value = text.get(i..k).unwrap_or_default();
                if bytes.get(k) == Some(&b';') {
                    fields.push(value.to_owned());
                    i = k + 1;
                } else {
                    fields.push(value.strip_suffix('\r').unwrap_or(value).to_owned());
                    break Ok((k + 1).min(bytes.len()));
                }
            }
        };
        let (end, fields) = match outcome {
            Ok(end) => (end, Ok(fields)),
            // Resume after the record's first line: a stray quote costs that line only.
            Err(m) => (
                find(bytes, start, |b| b == b'\n').map_or(bytes.len(), |k| k + 1),
                Err(m),
            ),
        };
        self.line += newlines(bytes, start, end);
        self.pos = end;
        Some(Record { line, fields })
    }
}

/// A date cell in one of the tables' formats, written exactly as the format writes it.
pub(super) fn parse_date(tables: &Tables, raw: &str) -> Option<Date> {
    let raw = raw.trim();
    tables.date_formats.iter().find_map(|f| {
        let d = strtime::parse(f.as_str(), raw).ok()?.to_date().ok()?;
        (strtime::format(f.as_str(), d).ok()? == raw).then_some(d)
    })
}

/// A time cell in one of the tables' formats, written exactly as the format writes it.
pub(super) fn parse_time(tables: &Tables, raw: &str) -> Option<Time> {
    let raw = raw.trim();
    tables.time_formats.iter().find_map(|f| {
        let t = strtime::parse(f.as_str(), raw).ok()?.to_time().ok()?;
        (strtime::format(f.as_str(), t).ok()? == raw).then_some(t)
    })
}

/// A number cell (trimmed, not empty): digits with at most one decimal separator (a point, or
/// a comma where the locale allows it), no sign, no grouping. Returns the normalized text
/// (comma → point), the value and the decimal places written.
fn parse_number(raw: &str, decimal_comma: bool) -> Option<(String, f64, i32)> {
    let normalized = if decimal_comma {
        raw.replace(',', ".")
    } else {
        raw.to_owned()
    };
    let (int, frac) = match normalized.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (normalized.as_str(), None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || frac.is_some_and(|f| !digits(f)) {
        return None;
    }
    let decimals = i32::try_from(frac.map_or(0, str::len)).ok()?;
    let value = normalized.parse::<f64>().ok().filter(|v| v.is_finite())?;
    if decimals <= MAX_PLAUSIBLE_DECIMALS {
        return Some((normalized, value, decimals));
    }
    // The app writes some values as the f64 expansion of a 32-bit float (59.54 as
    // `59.54000091552734`) or padded (`62.500000`): no scale measures that finely, so the value
    // is the shortest decimal that is the same 32-bit float, with its places.
    #[allow(clippy::cast_possible_truncation)]
    let short = (value as f32).to_string();
    let places = short.split_once('.').map_or(0, |(_, f)| f.len());
    let value = short.parse::<f64>().ok()?;
    Some((normalized, value, i32::try_from(places).ok()?))
}

/// More decimal places than any bathroom scale or cuff resolves: written by the app's float
/// formatting, not by the device.
const MAX_PLAUSIBLE_DECIMALS: i32 = 3;

/// A yes/no cell: 1 or 0 (empty is 0).
fn parse_flag(tables: &Tables, raw: &str) -> Option<u8> {
    let word = raw.trim().to_lowercase();
    if word.is_empty() || tables.no.contains(&word) {
        Some(0)
    } else if tables.yes.contains(&word) {
        Some(1)
    } else {
        None
    }
}

/// One column of a table definition in a header.
#[derive(Debug)]
struct Slot<'t> {
    column: &'t Column,
    /// Index in the header and the label as written; `None`: an optional column absent.
    at: Option<(usize, String)>,
}

/// A recognized table header.
#[derive(Debug)]
struct Layout<'t> {
    table: &'t str,
    locale: &'t str,
    decimal_comma: bool,
    /// Number of columns of the header.
    width: usize,
    /// The Date and Time labels as written.
    date_label: String,
    time_label: String,
    /// The table's columns, in definition order.
    slots: Vec<Slot<'t>>,
    /// The unit the label column chose: its label (`kg`) and definition.
    unit: Option<(&'t str, &'t Unit)>,
}

/// Recognizes a table header: the first two cells are a locale's Date and Time labels and
/// every further cell a column of one table of that locale, with every column the table
/// needs. `Ok(None)`: not a header line.
fn match_header<'t>(
    tables: &'t Tables,
    fields: &[String],
    line: usize,
) -> Result<Option<Layout<'t>>, ExportError> {
    let [date, time, rest @ ..] = fields else {
        return Ok(None);
    };
    // The attempt that knew the most labels explains a refused header.
    let mut best: Option<(usize, ExportError)> = None;
    for (locale_name, locale) in &tables.locales {
        if !super::same(date, &locale.date) || !super::same(time, &locale.time) {
            continue;
        }
        for (table_name, table) in &tables.tables {
            match layout_for(table_name, &table.columns, locale_name, rest, line, tables) {
                Ok((slots, unit)) => {
                    return Ok(Some(Layout {
                        table: table_name,
                        locale: locale_name,
                        decimal_comma: locale.decimal_comma,
                        width: fields.len(),
                        date_label: clip(date),
                        time_label: clip(time),
                        slots,
                        unit,
                    }));
                }
                Err((known, e)) => {
                    if best.as_ref().is_none_or(|(k, _)| known > *k) {
                        best = Some((known, e));
                    }
                }
            }
        }
    }
    match best {
        Some((_, e)) => Err(e),
        None => Ok(None),
    }
}

type Matched<'t> = (Vec<Slot<'t>>, Option<(&'t str, &'t Unit)>);

/// Places the header's cells after Date and Time on a table's columns; on failure, how many
/// cells the table knew and the error.
fn layout_for<'t>(
    table_name: &str,
    columns: &'t [Column],
    locale: &str,
    rest: &[String],
    line: usize,
    tables: &'t Tables,
) -> Result<Matched<'t>, (usize, ExportError)> {
    let spelling = |c: &'t Column, label: &str| {
        c.labels
            .get(locale)
            .and_then(|ls| ls.iter().find(|l| super::same(l, label)))
    };
    let mut at: Vec<Option<(usize, String)>> = vec![None; columns.len()];
    let mut unit = None;
    let mut known = 0;
    let mut problem = None;
    for (i, label) in rest.iter().enumerate() {
        let Some((c, column, written)) = columns
            .iter()
            .enumerate()
            .find_map(|(c, column)| spelling(column, label).map(|w| (c, column, w)))
        else {
            problem.get_or_insert(ExportError::UnknownColumn {
                line,
                column: clip(label),
            });
            continue;
        };
        known += 1;
        let Some(slot) = at.get_mut(c) else {
            continue;
        };
        if slot.is_some() {
            problem.get_or_insert(ExportError::DuplicateColumn {
                line,
                column: clip(label),
            });
            continue;
        }
        *slot = Some((i + 2, clip(label)));
        if column.unit_from == Some(UnitFrom::Label) {
            unit = tables
                .units
                .get_key_value(written.trim())
                .map(|(k, u)| (k.as_str(), u));
        }
    }
    if problem.is_none()
        && let Some(column) = columns
            .iter()
            .zip(&at)
            .find_map(|(c, a)| (a.is_none() && !c.optional).then_some(c))
    {
        problem = Some(ExportError::MissingColumn {
            line,
            table: table_name.to_owned(),
            column: column
                .labels
                .get(locale)
                .and_then(|ls| ls.first())
                .cloned()
                .unwrap_or_default(),
        });
    }
    if let Some(e) = problem {
        return Err((known, e));
    }
    let slots = columns
        .iter()
        .zip(at)
        .map(|(column, at)| Slot { column, at })
        .collect();
    Ok((slots, unit))
}

/// The components of one data type in a row.
struct Group<'a> {
    data_type: &'a str,
    components: Vec<Component>,
    /// Value columns filled.
    values: usize,
    /// The first value column left empty.
    missing: Option<&'a str>,
}

/// Parses one data row of `layout`: its identity and Measurements, or the reason it is
/// rejected (naming the column, never the value).
fn parse_row(
    tables: &Tables,
    layout: &Layout<'_>,
    fields: &[String],
    tz: &TimeZone,
    zone: &str,
    ctx: &Context,
) -> Result<(String, Vec<Measurement>), String> {
    if fields.len() != layout.width {
        return Err(format!(
            "wrong number of columns: {} (the header has {})",
            fields.len(),
            layout.width
        ));
    }
    let cell = |i: usize| fields.get(i).map_or("", |f| f.trim());
    let date = parse_date(tables, cell(0)).ok_or_else(|| {
        format!(
            "column {}: not a date in an accepted format ({})",
            layout.date_label,
            tables.date_formats.join(", ")
        )
    })?;
    let time = parse_time(tables, cell(1)).ok_or_else(|| {
        format!(
            "column {}: not a time in an accepted format ({})",
            layout.time_label,
            tables.time_formats.join(", ")
        )
    })?;
    // "compatible": a gap time moves forward by the gap, an overlap time is the earlier one.
    let zoned = tz
        .to_ambiguous_zoned(date.to_datetime(time))
        .compatible()
        .map_err(|_| {
            format!(
                "columns {} and {}: the local time is outside the supported range",
                layout.date_label, layout.time_label
            )
        })?;

    let mut cells: Vec<String> = Vec::new();
    let mut groups: Vec<Group<'_>> = Vec::new();
    for slot in &layout.slots {
        let c = slot.column;
        let Some(data_type) = c.data_type.as_deref().map(str::trim) else {
            continue; // free text: never read
        };
        let label = slot.at.as_ref().map_or("", |(_, l)| l.as_str());
        let raw = slot.at.as_ref().map(|(i, _)| cell(*i));
        let g = match groups.iter().position(|g| g.data_type == data_type) {
            Some(k) => k,
            None => {
                groups.push(Group {
                    data_type,
                    components: Vec::new(),
                    values: 0,
                    missing: None,
                });
                groups.len() - 1
            }
        };
        let Some(group) = groups.get_mut(g) else {
            continue;
        };
        match c.kind {
            ColumnKind::FreeText => {}
            ColumnKind::Value => {
                let Some(raw) = raw.filter(|r| !r.is_empty()) else {
                    cells.push(String::new());
                    group.missing.get_or_insert(label);
                    continue;
                };
                let (normalized, value, decimals) = parse_number(raw, layout.decimal_comma)
                    .ok_or_else(|| format!("column {label}: not a number"))?;
                let (unit, to_bounds) = match (c.unit_from, &c.unit, layout.unit) {
                    (None, Some(unit), _) => (unit.trim(), 1.0),
                    (Some(_), _, Some((_, u))) => (u.ucum.as_str(), u.to_bounds),
                    _ => return Err(format!("column {label}: no unit")),
                };
                let in_bounds = value * to_bounds;
                if c.min.is_some_and(|m| in_bounds < m) || c.max.is_some_and(|m| in_bounds > m) {
                    return Err(format!("column {label}: out of range"));
                }
                group.components.push(Component {
                    code: c.component.clone(),
                    value,
                    unit: unit.to_owned(),
                    decimals: Some(decimals),
                });
                group.values += 1;
                cells.push(normalized);
            }
            ColumnKind::Flag => {
                let Some(raw) = raw else {
                    cells.push(String::new());
                    continue;
                };
                let v = parse_flag(tables, raw)
                    .ok_or_else(|| format!("column {label}: not a yes/no value"))?;
                group.components.push(Component {
                    code: c.component.clone(),
                    value: f64::from(v),
                    unit: c.unit.as_deref().unwrap_or("1").trim().to_owned(),
                    decimals: Some(0),
                });
                cells.push(v.to_string());
            }
        }
    }

    let table_tag = match layout.unit {
        Some((label, _)) => format!("{}[{label}]", layout.table),
        None => layout.table.to_owned(),
    };
    let local_time = if time.second() == 0 {
        format!("{:02}:{:02}", time.hour(), time.minute())
    } else {
        format!(
            "{:02}:{:02}:{:02}",
            time.hour(),
            time.minute(),
            time.second()
        )
    };
    let identity = format!("{table_tag}|{date}|{local_time}|{}|{zone}", cells.join("|"));
    let digest = hex::encode(Sha256::digest(identity.as_bytes()));
    let row_id = digest
        .get(..ROW_ID_HEX_DIGITS)
        .unwrap_or(&digest)
        .to_owned();

    let effective_start = zoned.timestamp().as_millisecond();
    let offset = zoned.offset().seconds();
    let mut measurements = Vec::with_capacity(groups.len());
    for g in groups.into_iter().filter(|g| g.values > 0) {
        if let Some(missing) = g.missing {
            return Err(format!(
                "column {missing}: empty while the row has other {} values",
                g.data_type
            ));
        }
        measurements.push(Measurement {
            context: ctx.clone(),
            measurement_id: format!("{NAME}:{}:{row_id}:{}", ctx.provider_user_id, g.data_type),
            series_key: series_key(&ctx.patient_id, &ctx.provider, g.data_type),
            data_type: g.data_type.to_owned(),
            aggregation: AGGREGATION_INDIVIDUAL.to_owned(),
            effective_start,
            effective_end: None,
            utc_offset_seconds: Some(offset),
            components: g.components,
            device: None,
            entry_method: None,
            provider_group_id: Some(row_id.clone()),
            provider_modified_at: None,
            fetched_through: None,
            status: None,
            waveform: None,
        });
    }
    if measurements.is_empty() {
        return Err("no value in any column".into());
    }
    Ok((row_id, measurements))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            organization_id: "org".into(),
            ehr_target_id: "ehr".into(),
            patient_id: "p1".into(),
            patient_reference: "Patient/1".into(),
            provider: NAME.into(),
            link_id: "link".into(),
            provider_user_id: "u7".into(),
            sync_request_id: "sr".into(),
            trigger: "MANUAL".into(),
            received_at: 1,
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    const BERLIN: &str = "Europe/Berlin";

    /// The head of the verified export (ppjanka/beurer-scale-data
    /// `HealthManagerApp_DataExport.csv`): its preamble and title line, quoted rows, a row
    /// with only weight and BMI, unquoted rows with extra precision.
    const VERIFIED_EN: &str = "Data Export Details\n\
        \n\
        User details\n\
        \"Gender\";\"\"\n\
        \"First name\";\"\"\n\
        \"Surname\";\"\"\n\
        \"Date of birth\";\"yyyy-mm-dd\"\n\
        \n\
        Period\n\
        \"Start\";\"2020-05-31\"\n\
        \"End\";\"2021-05-30\"\n\
        \n\
        Category\n\
        \"Scale\";000\n\
        \n\
        Weight\n\
        Date;Time;kg;BMI;Body fat;Water;Muscles;Bones;Medication;Comment\n\
        \"2022-02-01\";\"09:26\";\"62.5\";\"21.4\";\"15.8\";\"57.8\";\"43.7\";\"2.8\";\"\";\"\"\n\
        \"2021-08-02\";\"08:31\";\"59\";\"20.2\";\"\";\"\";\"\";\"\";\"\";\"\"\n\
        \"2021-05-29\";\"09:08\";59.69;20.4;13.6;59.4069;44.8;2.67216;\"\";\"\"\n\
        \"2020-10-13\";\"08:32\";59.54000091552734;20.29999923706055;13.39999961853027;59.45582962036133;45;2.761642456054688;\"\";\"\"\n\
        \n";

    /// The variant of the brief: quoted section lines, a Period row with From/To.
    const BRIEF_EN: &str = "\"User details\"\n\
        \"Name\";\"Jane\"\n\
        \"Period\"\n\
        \"From\";\"2022-01-01\";\"To\";\"2022-02-28\"\n\
        \"Category\"\n\
        \"Weight\"\n\
        \n\
        Date;Time;kg;BMI;Body fat;Water;Muscles;Bones;Medication;Comment\n\
        \"2022-02-01\";\"09:26\";\"62.500000\";\"21.4\";\"15.8\";\"57.8\";\"43.7\";\"2.8\";\"\";\"\"\n";

    const GERMAN_LB: &str = "\"Benutzerdaten\"\n\
        \"Name\";\"Erika\"\n\
        \n\
        Gewicht\n\
        \"Datum\";\"Uhrzeit\";\"lb\";\"BMI\";\"Körperfett\";\"Wasser\";\"Muskeln\";\"Knochen\";\"Medikation\";\"Kommentar\"\n\
        \"01.02.2022\";\"09:00\";\"137,8\";\"21,4\";\"15,8\";\"57,8\";\"43,7\";\"6,2\";\"Ramipril 5 mg\";\"nach dem Frühstück\"\n\
        \"01.07.2022\";\"08:45\";\"138\";\"21.5\";\"\";\"\";\"\";\"\";\"\";\"\"\n";

    const BP_EN: &str = "\"Category\"\n\
        \"Blood pressure monitor\"\n\
        \n\
        Blood pressure\n\
        Date;Time;Systolic;Diastolic;Pulse;Irregular heartbeat;Medication;Comment\n\
        \"2022-02-01\";\"09:00\";\"128\";\"82\";\"64\";\"yes\";\"\";\"after a walk\"\n\
        \"2022-02-02\";\"09:00\";\"121\";\"79\";\"61\";\"\";\"\";\"\"\n";

    const BP_DE: &str = "Blutdruck\n\
        Datum;Uhrzeit;Systolisch;Diastolisch;Puls;Arrhythmie;Medikation;Kommentar\n\
        \"01.02.2022\";\"09:00\";\"128\";\"82\";\"64\";\"ja\";\"\";\"\"\n\
        \"02.02.2022\";\"09:00\";\"121\";\"79\";\"\";\"nein\";\"\";\"\"\n";

    fn parse(text: &str) -> ParsedExport {
        parse_export(text.as_bytes(), &ctx(), BERLIN).unwrap()
    }

    fn component<'a>(m: &'a Measurement, code: &str) -> &'a Component {
        m.components.iter().find(|c| c.code == code).unwrap()
    }

    fn by_type<'a>(row: &'a ImportedRow, data_type: &str) -> &'a Measurement {
        row.measurements
            .iter()
            .find(|m| m.data_type == data_type)
            .unwrap()
    }

    fn fields(text: &str) -> Vec<Result<Vec<String>, Malformed>> {
        Records::new(text).map(|r| r.fields).collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    // --- the record reader -------------------------------------------------------------

    #[test]
    fn test_records_split_quoted_and_unquoted_fields() {
        assert_eq!(
            fields("\"a\";b;\"c;d\";\"say \"\"hi\"\"\";;\"\"\n"),
            [Ok(strings(&["a", "b", "c;d", "say \"hi\"", "", ""]))]
        );
        // CRLF, a trailing delimiter, a last line without newline, a blank line
        assert_eq!(
            fields("x;\"y\"\r\n\r\nz;\r\nlast"),
            [
                Ok(strings(&["x", "y"])),
                Ok(strings(&[""])),
                Ok(strings(&["z", ""])),
                Ok(strings(&["last"])),
            ]
        );
    }

    #[test]
    fn test_records_carry_their_start_line_across_multiline_fields() {
        let records: Vec<Record> = Records::new("a;\"two\nlines\";b\nc\n").collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].line, 1);
        assert_eq!(records[0].fields, Ok(strings(&["a", "two\nlines", "b"])));
        assert_eq!(records[1].line, 3);
        assert_eq!(records[1].fields, Ok(strings(&["c"])));
    }

    #[test]
    fn test_broken_quoting_costs_one_line_only() {
        let records: Vec<Record> =
            Records::new("\"a\"x;b\nok;1\n\"never closed;2\nnext;3\n").collect();
        let got: Vec<_> = records.iter().map(|r| (r.line, r.fields.clone())).collect();
        assert_eq!(
            got,
            [
                (1, Err(Malformed::TextAfterQuote)),
                (2, Ok(strings(&["ok", "1"]))),
                (3, Err(Malformed::Unterminated)),
                (4, Ok(strings(&["next", "3"]))),
            ]
        );
    }

    #[test]
    fn test_numbers_dates_and_times() {
        assert_eq!(parse_number("62.5", false), Some(("62.5".into(), 62.5, 1)));
        assert_eq!(
            parse_number("62.500000", false),
            Some(("62.500000".into(), 62.5, 1))
        );
        assert_eq!(
            parse_number("62.50", false),
            Some(("62.50".into(), 62.5, 2)),
            "places a scale can write are kept"
        );
        assert_eq!(
            parse_number("59.54000091552734", false),
            Some(("59.54000091552734".into(), 59.54, 2))
        );
        assert_eq!(parse_number("62,5", true), Some(("62.5".into(), 62.5, 1)));
        assert_eq!(parse_number("63", false), Some(("63".into(), 63.0, 0)));
        for bad in [
            "62,5", "-1", "+1", "1e3", "6 2", "62.", ".5", "1.2.3", "NaN", "inf",
        ] {
            assert_eq!(parse_number(bad, false), None, "{bad}");
        }
        assert_eq!(parse_number("1.102,5", true), None);
        let t = Tables::builtin().unwrap();
        let d = Date::new(2022, 2, 1).unwrap();
        assert_eq!(parse_date(t, "2022-02-01"), Some(d));
        assert_eq!(parse_date(t, "01.02.2022"), Some(d));
        for bad in [
            "02/01/2022",
            "2022-2-1",
            "01.02.22",
            "2022-02-30",
            "",
            "yyyy-mm-dd",
        ] {
            assert_eq!(parse_date(t, bad), None, "{bad}");
        }
        let nine = Time::new(9, 26, 0, 0).unwrap();
        assert_eq!(parse_time(t, "09:26"), Some(nine));
        assert_eq!(parse_time(t, "9:26"), Some(nine));
        for bad in ["25:00", "09:60", "0926", "9.26", "09:26 AM", ""] {
            assert_eq!(parse_time(t, bad), None, "{bad}");
        }
        assert_eq!(parse_flag(t, " Ja "), Some(1));
        assert_eq!(parse_flag(t, "x"), Some(1));
        assert_eq!(parse_flag(t, ""), Some(0));
        assert_eq!(parse_flag(t, "nein"), Some(0));
        assert_eq!(parse_flag(t, "maybe"), None);
    }

    // --- weight ------------------------------------------------------------------------

    #[test]
    fn test_verified_english_weight_sample() {
        let p = parse(VERIFIED_EN);
        assert_eq!(p.tables, ["weight/en"]);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        assert_eq!(p.imported.len(), 4);

        // winter: CET, +01:00
        let row = &p.imported[0];
        assert_eq!(row.line, 18);
        assert_eq!(row.row_id.len(), 32);
        let types: Vec<_> = row
            .measurements
            .iter()
            .map(|m| m.data_type.as_str())
            .collect();
        assert_eq!(
            types,
            [
                "body_weight",
                "body_mass_index",
                "body_fat_percentage",
                "body_water_percentage",
                "muscle_percentage",
                "bone_mass"
            ]
        );
        let expected = [
            ("body_weight", 62.5, "kg"),
            ("body_mass_index", 21.4, "kg/m2"),
            ("body_fat_percentage", 15.8, "%"),
            ("body_water_percentage", 57.8, "%"),
            ("muscle_percentage", 43.7, "%"),
            ("bone_mass", 2.8, "kg"),
        ];
        for (m, (data_type, value, unit)) in row.measurements.iter().zip(expected) {
            assert_eq!(
                m.components,
                [Component {
                    code: "value".into(),
                    value,
                    unit: unit.into(),
                    decimals: Some(1),
                }],
                "{data_type}"
            );
            assert_eq!(m.effective_start, 1_643_703_960_000); // 2022-02-01T08:26:00Z
            assert_eq!(m.utc_offset_seconds, Some(3600));
            assert_eq!(
                m.measurement_id,
                format!("beurer:u7:{}:{data_type}", row.row_id)
            );
            assert_eq!(m.series_key, format!("p1/beurer/{data_type}"));
            assert_eq!(m.provider_group_id.as_deref(), Some(row.row_id.as_str()));
            assert_eq!(m.aggregation, AGGREGATION_INDIVIDUAL);
            assert_eq!(m.context, ctx());
            assert!(m.device.is_none() && m.entry_method.is_none());
            assert!(m.effective_end.is_none() && m.provider_modified_at.is_none());
            assert!(m.fetched_through.is_none());
        }

        // only weight and BMI measured: the other data types are absent, not an error
        let partial = &p.imported[1];
        let types: Vec<_> = partial
            .measurements
            .iter()
            .map(|m| m.data_type.as_str())
            .collect();
        assert_eq!(types, ["body_weight", "body_mass_index"]);
        assert_eq!(
            component(&partial.measurements[0], "value").decimals,
            Some(0)
        );

        // summer: CEST, +02:00; unquoted numbers with extra precision keep it
        let summer = &p.imported[2];
        let weight = by_type(summer, "body_weight");
        assert_eq!(weight.effective_start, 1_622_272_080_000); // 2021-05-29T07:08:00Z
        assert_eq!(weight.utc_offset_seconds, Some(7200));
        assert_eq!(component(weight, "value").value, 59.69);
        assert_eq!(component(weight, "value").decimals, Some(2));
        let bones = component(by_type(summer, "bone_mass"), "value");
        assert_eq!((bones.value, bones.decimals), (2.67216, Some(5)));
        // the f64 expansion of a 32-bit float is the float's shortest decimal
        let float32 = component(by_type(&p.imported[3], "body_weight"), "value");
        assert_eq!((float32.value, float32.decimals), (59.54, Some(2)));
    }

    #[test]
    fn test_brief_preamble_and_extra_precision() {
        let p = parse(BRIEF_EN);
        assert_eq!(p.tables, ["weight/en"]);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let row = &p.imported[0];
        assert_eq!(row.line, 9);
        let w = component(by_type(row, "body_weight"), "value");
        // `62.500000`: padding, not precision
        assert_eq!((w.value, w.decimals), (62.5, Some(1)));
    }

    #[test]
    fn test_german_weight_with_decimal_comma_dates_and_pounds() {
        let p = parse(GERMAN_LB);
        assert_eq!(p.tables, ["weight/de"]);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let row = &p.imported[0];
        assert_eq!(row.line, 6);
        let weight = by_type(row, "body_weight");
        assert_eq!(
            weight.components,
            [Component {
                code: "value".into(),
                value: 137.8,
                unit: "[lb_av]".into(),
                decimals: Some(1),
            }]
        );
        assert_eq!(weight.effective_start, 1_643_702_400_000); // 2022-02-01T08:00:00Z
        assert_eq!(weight.utc_offset_seconds, Some(3600));
        // bones follow the weight column's unit
        let bones = component(by_type(row, "bone_mass"), "value");
        assert_eq!((bones.value, bones.unit.as_str()), (6.2, "[lb_av]"));
        assert_eq!(
            component(by_type(row, "body_mass_index"), "value").value,
            21.4
        );
        assert_eq!(
            component(by_type(row, "body_fat_percentage"), "value").unit,
            "%"
        );
        // a point is accepted in German too; summer time
        let july = &p.imported[1];
        let w = component(by_type(july, "body_weight"), "value");
        assert_eq!((w.value, w.decimals), (138.0, Some(0)));
        assert_eq!(
            by_type(july, "body_weight").effective_start,
            1_656_657_900_000 // 2022-07-01T06:45:00Z
        );
        // free text is never copied into a record
        let all = format!("{p:?}");
        assert!(
            !all.contains("Ramipril") && !all.contains("Frühstück"),
            "{all}"
        );
    }

    #[test]
    fn test_same_reading_in_english_and_german_has_one_identity() {
        let en = "Date;Time;kg;BMI;Body fat;Water;Muscles;Bones;Medication;Comment\n\
            2022-02-01;09:26;62.5;21.4;15.8;57.8;43.7;2.8;;\n";
        let de = "Datum;Uhrzeit;kg;BMI;Körperfett;Wasser;Muskeln;Knochen;Medikation;Kommentar\n\
            01.02.2022;09:26;62,5;21,4;15,8;57,8;43,7;2,8;;Kommentar\n";
        let (en, de) = (parse(en), parse(de));
        assert_eq!(en.imported[0].row_id, de.imported[0].row_id);
        assert_eq!(en.imported[0].measurements, de.imported[0].measurements);
        // ... but not the same reading in pounds
        let lb = parse(
            "Date;Time;lb;BMI;Body fat;Water;Muscles;Bones;Medication;Comment\n\
            2022-02-01;09:26;62.5;21.4;15.8;57.8;43.7;2.8;;\n",
        );
        assert_ne!(lb.imported[0].row_id, en.imported[0].row_id);
    }

    // --- blood pressure ----------------------------------------------------------------

    #[test]
    fn test_english_blood_pressure_with_irregular_flag_and_pulse() {
        let p = parse(BP_EN);
        assert_eq!(p.tables, ["blood_pressure/en"]);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let row = &p.imported[0];
        assert_eq!(row.line, 6);
        let types: Vec<_> = row
            .measurements
            .iter()
            .map(|m| m.data_type.as_str())
            .collect();
        assert_eq!(types, ["blood_pressure", "heart_rate"]);
        let bp = by_type(row, "blood_pressure");
        let mmhg = |code: &str, value: f64| Component {
            code: code.into(),
            value,
            unit: "mm[Hg]".into(),
            decimals: Some(0),
        };
        assert_eq!(
            bp.components,
            [
                mmhg("systolic", 128.0),
                mmhg("diastolic", 82.0),
                Component {
                    code: "irregular_heartbeat".into(),
                    value: 1.0,
                    unit: "1".into(),
                    decimals: Some(0),
                },
            ]
        );
        assert_eq!(
            bp.measurement_id,
            format!("beurer:u7:{}:blood_pressure", row.row_id)
        );
        let hr = by_type(row, "heart_rate");
        assert_eq!(
            hr.components,
            [Component {
                code: "value".into(),
                value: 64.0,
                unit: "/min".into(),
                decimals: Some(0),
            }]
        );
        assert_eq!(
            hr.measurement_id,
            format!("beurer:u7:{}:heart_rate", row.row_id)
        );
        assert_eq!(hr.effective_start, bp.effective_start);
        // an empty irregular cell is "no"
        let second = by_type(&p.imported[1], "blood_pressure");
        assert_eq!(component(second, "irregular_heartbeat").value, 0.0);
        assert!(!format!("{p:?}").contains("walk"));
    }

    #[test]
    fn test_german_blood_pressure_and_a_missing_pulse() {
        let p = parse(BP_DE);
        assert_eq!(p.tables, ["blood_pressure/de"]);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let first = &p.imported[0];
        assert_eq!(
            component(by_type(first, "blood_pressure"), "irregular_heartbeat").value,
            1.0
        );
        assert_eq!(component(by_type(first, "heart_rate"), "value").value, 64.0);
        // no pulse: blood pressure only, with the "nein" flag
        let second = &p.imported[1];
        let types: Vec<_> = second
            .measurements
            .iter()
            .map(|m| m.data_type.as_str())
            .collect();
        assert_eq!(types, ["blood_pressure"]);
        assert_eq!(
            component(&second.measurements[0], "irregular_heartbeat").value,
            0.0
        );
    }

    #[test]
    fn test_blood_pressure_without_the_irregular_column() {
        let p = parse(
            "Date;Time;Systolic;Diastolic;Pulse;Medication;Comment\n\
             2022-02-01;09:00;128;82;64;;\n",
        );
        let bp = by_type(&p.imported[0], "blood_pressure");
        let codes: Vec<_> = bp.components.iter().map(|c| c.code.as_str()).collect();
        assert_eq!(codes, ["systolic", "diastolic"]);
    }

    #[test]
    fn test_a_file_with_both_tables() {
        let text = format!("{VERIFIED_EN}\n{BP_EN}");
        let p = parse(&text);
        assert_eq!(p.tables, ["weight/en", "blood_pressure/en"]);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        assert_eq!(p.imported.len(), 6);
        assert_eq!(p.imported[4].line, 29);
        assert_eq!(p.imported[4].measurements[0].data_type, "blood_pressure");
        // a section title right after the rows (no blank line) ends the table too
        let tight = format!(
            "{}Blood pressure\n{}",
            BRIEF_EN,
            BP_EN.split_once("Blood pressure\n").unwrap().1
        );
        let p = parse(&tight);
        assert_eq!(p.tables, ["weight/en", "blood_pressure/en"]);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        assert_eq!(p.imported.len(), 3);
    }

    // --- rejected rows -----------------------------------------------------------------

    #[test]
    fn test_bad_rows_are_rejected_and_the_rest_imported() {
        let text = "Date;Time;kg;BMI;Body fat;Water;Muscles;Bones;Medication;Comment\n\
            2022-02-01;09:26;62.5;21.4;15.8;57.8;43.7;2.8;;\n\
            2022-02-02;09:26;62.5;21.4;15.8;57.8;43.7;2.8;\n\
            02/03/2022;09:26;62.5;21.4;15.8;57.8;43.7;2.8;;\n\
            2022-02-04;9h26;62.5;21.4;15.8;57.8;43.7;2.8;;\n\
            2022-02-05;09:26;62.5;abc;15.8;57.8;43.7;2.8;;\n\
            2022-02-06;09:26;777.7;21.4;15.8;57.8;43.7;2.8;;\n\
            2022-02-07;09:26;62,5;21.4;15.8;57.8;43.7;2.8;;\n\
            2022-02-08;09:26;;;;;;;secret;\n\
            2022-02-09;09:26;\"62.5\"x;21.4;15.8;57.8;43.7;2.8;;\n\
            2022-02-01;09:26;62.5;21.4;15.8;57.8;43.7;2.8;;again\n\
            2022-02-10;09:26;62.4;21.3;15.7;57.9;43.7;2.8;;\n";
        let p = parse(text);
        let lines: Vec<_> = p.imported.iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 12]);
        let rejected: Vec<(usize, &str)> = p
            .rejected
            .iter()
            .map(|r| (r.line, r.reason.as_str()))
            .collect();
        assert_eq!(
            rejected,
            [
                (3, "wrong number of columns: 9 (the header has 10)"),
                (
                    4,
                    "column Date: not a date in an accepted format (%Y-%m-%d, %d.%m.%Y)"
                ),
                (
                    5,
                    "column Time: not a time in an accepted format (%H:%M, %-H:%M)"
                ),
                (6, "column BMI: not a number"),
                (7, "column kg: out of range"),
                // a decimal comma in an English export
                (8, "column kg: not a number"),
                (9, "no value in any column"),
                (10, "malformed quoting: text after a closing quote"),
                // the comment differs, the reading does not
                (11, "duplicate row (same as line 2)"),
            ]
        );
        for r in &p.rejected {
            for value in ["62", "777", "abc", "secret", "02/03", "9h26"] {
                assert!(!r.reason.contains(value), "{r:?}");
            }
        }
    }

    #[test]
    fn test_half_a_blood_pressure_and_a_bad_flag_are_rejected() {
        let p = parse(
            "Date;Time;Systolic;Diastolic;Pulse;Irregular heartbeat;Medication;Comment\n\
             2022-02-01;09:00;128;;64;no;;\n\
             2022-02-01;09:05;128;82;64;perhaps;;\n\
             2022-02-01;09:10;128;82;300;no;;\n\
             2022-02-01;09:15;;;;yes;;\n\
             2022-02-01;09:20;;;64;;;\n",
        );
        let rejected: Vec<(usize, &str)> = p
            .rejected
            .iter()
            .map(|r| (r.line, r.reason.as_str()))
            .collect();
        assert_eq!(
            rejected,
            [
                (
                    2,
                    "column Diastolic: empty while the row has other blood_pressure values"
                ),
                (3, "column Irregular heartbeat: not a yes/no value"),
                (4, "column Pulse: out of range"),
                (5, "no value in any column"),
            ]
        );
        // a pulse alone is a heart rate
        let types: Vec<_> = p.imported[0]
            .measurements
            .iter()
            .map(|m| m.data_type.as_str())
            .collect();
        assert_eq!(types, ["heart_rate"]);
    }

    #[test]
    fn test_rows_outside_a_table_are_reported() {
        let p = parse(&format!(
            "{BRIEF_EN}\n2022-02-02;09:26;62.5;21.4;15.8;57.8;43.7;2.8;;\n"
        ));
        assert_eq!(p.imported.len(), 1);
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.rejected[0].line, 11);
        assert!(
            p.rejected[0]
                .reason
                .starts_with("row outside a recognized table")
        );
    }

    // --- malformed files ---------------------------------------------------------------

    #[test]
    fn test_malformed_files_name_the_line() {
        let err = |bytes: &[u8]| parse_export(bytes, &ctx(), BERLIN).unwrap_err();
        // Windows-1252: "Körperfett" with 0xF6 in the header on line 5
        let mut latin1 =
            b"\"Benutzerdaten\"\n\"Name\";\"Erika\"\n\nGewicht\nDatum;Uhrzeit;kg;BMI;K".to_vec();
        latin1.push(0xF6);
        latin1.extend_from_slice(b"rperfett;Wasser;Muskeln;Knochen;Medikation;Kommentar\n");
        let e = err(&latin1);
        assert_eq!(e, ExportError::NotUtf8 { line: 5 });
        assert!(
            e.to_string().starts_with("line 5: the file is not UTF-8"),
            "{e}"
        );
        // UTF-16 (with its byte order mark) fails on line 1
        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain("Date;Time\n".encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        assert_eq!(err(&utf16), ExportError::NotUtf8 { line: 1 });

        assert_eq!(
            err(b"\"User details\"\n\"Name\";\"Jane\"\n"),
            ExportError::NoTable
        );
        assert_eq!(err(b""), ExportError::NoTable);
        // an unknown app language is not a table header
        assert_eq!(
            err(b"Date;Heure;kg;IMC\n2022-02-01;09:26;62.5;21.4\n"),
            ExportError::NoTable
        );

        let e = err(b"\"Weight\"\n\nDate;Time;kg;BMI;Body fat;Water;Muscles;Bones;Visceral fat;Medication;Comment\n");
        assert_eq!(
            e,
            ExportError::UnknownColumn {
                line: 3,
                column: "Visceral fat".into()
            }
        );
        assert!(e.to_string().starts_with("line 3: unknown column"), "{e}");
        assert_eq!(
            err(b"x\nDatum;Uhrzeit;Systolisch;Diastolisch;Pulse;Medikation;Kommentar\n"),
            ExportError::UnknownColumn {
                line: 2,
                column: "Pulse".into()
            }
        );
        let e = err(b"Date;Time;kg;BMI;Water;Muscles;Bones;Medication;Comment\n");
        assert_eq!(
            e,
            ExportError::MissingColumn {
                line: 1,
                table: "weight".into(),
                column: "Body fat".into()
            }
        );
        assert!(e.to_string().starts_with("line 1: "), "{e}");
        assert_eq!(
            err(b"\n\nDate;Time;Systolic;Diastolic;Pulse;Pulse\n"),
            ExportError::DuplicateColumn {
                line: 3,
                column: "Pulse".into()
            }
        );
        // the whole file fails even when another table was fine
        let both = format!("{VERIFIED_EN}\nDate;Time;SpO2;Pulse\n");
        assert!(matches!(
            err(both.as_bytes()),
            ExportError::UnknownColumn { line: 24, .. }
        ));
    }

    #[test]
    fn test_unknown_time_zone_fails_the_call() {
        let e = parse_export(VERIFIED_EN.as_bytes(), &ctx(), "Mars/Olympus_Mons").unwrap_err();
        assert_eq!(
            e,
            ExportError::UnknownTimeZone {
                zone: "Mars/Olympus_Mons".into()
            }
        );
        assert!(parse_export(VERIFIED_EN.as_bytes(), &ctx(), "").is_err());
    }

    #[test]
    fn test_byte_order_mark_and_crlf() {
        let plain = parse(BRIEF_EN);
        let mut bytes = b"\xEF\xBB\xBF".to_vec();
        bytes.extend_from_slice(BRIEF_EN.replace('\n', "\r\n").as_bytes());
        let bom = parse_export(&bytes, &ctx(), BERLIN).unwrap();
        assert_eq!(bom, plain);
        // a BOM right before the header line
        let header_first =
            "\u{FEFF}Date;Time;Systolic;Diastolic;Pulse\n2022-02-01;09:00;120;80;60\n";
        assert_eq!(parse(header_first).imported.len(), 1);
    }

    // --- time --------------------------------------------------------------------------

    #[test]
    fn test_dst_gap_and_overlap_are_resolved_compatibly_and_imported() {
        let p = parse(
            "Date;Time;Systolic;Diastolic;Pulse\n\
             2022-03-27;02:30;120;80;60\n\
             2022-10-30;02:30;121;81;61\n",
        );
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        // 02:30 does not exist (02:00 CET → 03:00 CEST): read as 03:30 CEST
        let gap = &p.imported[0].measurements[0];
        assert_eq!(gap.effective_start, 1_648_344_600_000); // 2022-03-27T01:30:00Z
        assert_eq!(gap.utc_offset_seconds, Some(7200));
        // 02:30 happens twice: the earlier one, CEST
        let overlap = &p.imported[1].measurements[0];
        assert_eq!(overlap.effective_start, 1_667_089_800_000); // 2022-10-30T00:30:00Z
        assert_eq!(overlap.utc_offset_seconds, Some(7200));
    }

    #[test]
    fn test_other_zones_change_the_instant_and_the_identity() {
        let berlin = parse(BRIEF_EN);
        let ny = parse_export(BRIEF_EN.as_bytes(), &ctx(), "America/New_York").unwrap();
        let (b, n) = (&berlin.imported[0], &ny.imported[0]);
        assert_eq!(
            n.measurements[0].effective_start - b.measurements[0].effective_start,
            6 * 3_600_000
        );
        assert_eq!(n.measurements[0].utc_offset_seconds, Some(-5 * 3600));
        assert_ne!(n.row_id, b.row_id);
    }

    // --- identity ----------------------------------------------------------------------

    #[test]
    fn test_the_same_file_twice_gives_identical_records() {
        let text = format!("{VERIFIED_EN}\n{BP_EN}");
        let a = parse(&text);
        let b = parse(&text);
        assert_eq!(a, b);
        let ids: Vec<_> = a
            .imported
            .iter()
            .flat_map(|r| r.measurements.iter().map(|m| m.measurement_id.clone()))
            .collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn test_an_edited_value_is_a_new_identity_and_free_text_is_not() {
        let row = |cells: &str| {
            let p = parse(&format!(
                "Date;Time;kg;BMI;Body fat;Water;Muscles;Bones;Medication;Comment\n{cells}\n"
            ));
            p.imported[0].row_id.clone()
        };
        let base = row("2022-02-01;09:26;62.5;21.4;15.8;57.8;43.7;2.8;;");
        assert_eq!(
            base,
            row("\"2022-02-01\";\"09:26\";\" 62.5 \";21.4;15.8;57.8;43.7;2.8;\"\";\"\"")
        );
        assert_eq!(
            base,
            row("2022-02-01;09:26;62.5;21.4;15.8;57.8;43.7;2.8;Aspirin;note")
        );
        assert_ne!(base, row("2022-02-01;09:26;62.6;21.4;15.8;57.8;43.7;2.8;;"));
        assert_ne!(base, row("2022-02-01;09:26;62.5;21.4;15.8;57.8;43.7;;;"));
        assert_ne!(base, row("2022-02-01;09:27;62.5;21.4;15.8;57.8;43.7;2.8;;"));
        // precision as written is part of the content
        assert_ne!(
            base,
            row("2022-02-01;09:26;62.50;21.4;15.8;57.8;43.7;2.8;;")
        );
        // the documented formula
        let expected = hex::encode(Sha256::digest(
            b"weight[kg]|2022-02-01|09:26|62.5|21.4|15.8|57.8|43.7|2.8|Europe/Berlin",
        ));
        assert_eq!(base, expected[..32]);
    }
}
