//! fhir-mapper binary: wiring only.

use fhir_mapper::map::MapperSettings;
use fhir_mapper::mapping::Mapping;
use fhir_mapper::r4::R4Rules;
use fhir_mapper::stage::{AggregateMapper, MapperCore, MeasurementMapper};
use ohx_common::kafka::StageSettings;
use ohx_common::records::topic;
use ohx_common::service::Runtime;
use std::sync::Arc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rt = Runtime::start(
        "fhir-mapper",
        9103,
        &[
            topic::MEASUREMENTS,
            topic::HOURLY_AGGREGATES,
            topic::FHIR_RESOURCES,
            topic::DEAD_LETTER,
        ],
    )
    .await?;
    let table = match std::env::var("OHX_MAPPING_FILE") {
        Ok(path) if !path.is_empty() => Mapping::from_file(std::path::Path::new(&path))?,
        _ => Mapping::default_table()?,
    };
    let settings = MapperSettings::new(ohx_common::config::string(
        "OHX_IDENTIFIER_BASE",
        "https://ohx.example/fhir",
    ))?;
    let r4_rules = match std::env::var("OHX_R4_RULES_FILE") {
        Ok(path) if !path.is_empty() => R4Rules::from_toml_str(&std::fs::read_to_string(&path)?)?,
        _ => R4Rules::default_rules()?,
    };
    let core = Arc::new(MapperCore::new(table, settings, r4_rules)?);
    let group = ohx_common::config::string("OHX_GROUP_ID", "ohx.fhir-mapper");
    let mut measurements = StageSettings::from_env("fhir-mapper", vec![topic::MEASUREMENTS])?;
    measurements.group_id = format!("{group}.measurements");
    let mut aggregates = StageSettings::from_env("fhir-mapper", vec![topic::HOURLY_AGGREGATES])?;
    aggregates.group_id = format!("{group}.aggregates");
    rt.run_two(
        measurements,
        MeasurementMapper::new(core.clone()),
        aggregates,
        AggregateMapper::new(core),
    )
    .await
}
