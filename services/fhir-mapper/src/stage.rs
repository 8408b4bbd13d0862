//! The Kafka side of the fhir-mapper: maps INDIVIDUAL measurements and hourly aggregates to
//! FHIR R5 resources, validates each against the R5 JSON schema, and produces them keyed by
//! identity. A record that cannot be mapped, or whose resource is invalid, goes to the
//! dead-letter topic with the reason; the stage keeps going.

use crate::map::{MappedResource, MapperSettings, canonical_json, map_aggregate, map_measurement};
use crate::mapping::Mapping;
use crate::validate::FhirValidator;
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{
    AGGREGATION_HOURLY, Context, FhirResource, HourlyAggregate, Measurement, resource_identity,
    topic,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use std::sync::{Arc, LazyLock};

static MAPPED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    ohx_common::telemetry::new_counter(
        "ohx_resources_mapped",
        "FHIR resources mapped, by type and outcome (valid, invalid)",
    )
});

/// What both mapper loops share: the code table, settings and the schema validator.
#[derive(Debug)]
pub struct MapperCore {
    pub table: Mapping,
    pub settings: MapperSettings,
    pub validator: FhirValidator,
}

impl MapperCore {
    /// Validates and emits mapped resources; an invalid resource dead-letters its input.
    async fn emit<T>(
        &self,
        input: &Input<T>,
        context: &Context,
        source_id: &str,
        resources: Vec<MappedResource>,
        source_revision: i64,
        out: &mut Emitter,
    ) -> Result<(), StageError> {
        // Validate all first: a record either produces all its resources or none.
        for r in &resources {
            if let Err(e) = self.validator.validate_all(&r.json) {
                MAPPED.add(
                    1,
                    &[
                        KeyValue::new("type", r.resource_type.clone()),
                        KeyValue::new("outcome", "invalid"),
                    ],
                );
                return out
                    .dead_letter(
                        input,
                        "validation",
                        format!("{} {} is not valid FHIR R5: {e}", r.resource_type, r.id),
                    )
                    .await;
            }
        }
        for r in resources {
            MAPPED.add(
                1,
                &[
                    KeyValue::new("type", r.resource_type.clone()),
                    KeyValue::new("outcome", "valid"),
                ],
            );
            let identity = resource_identity(&context.ehr_target_id, &r.resource_type, &r.id);
            let record = FhirResource {
                context: context.clone(),
                identity: identity.clone(),
                resource_type: r.resource_type,
                resource_id: r.id,
                resource: canonical_json(&r.json),
                source_ids: vec![source_id.to_string()],
                source_revision,
            };
            out.emit(topic::FHIR_RESOURCES, &identity, &record).await?;
        }
        Ok(())
    }
}

/// Maps measurements that are not aggregated hourly.
#[derive(Debug, Clone)]
pub struct MeasurementMapper(pub Arc<MapperCore>);

impl Processor for MeasurementMapper {
    type In = Measurement;
    type Change = ();

    async fn process(
        &mut self,
        batch: &[Input<Measurement>],
        out: &mut Emitter,
    ) -> Result<(), StageError> {
        for input in batch {
            let m = &input.value;
            if m.aggregation == AGGREGATION_HOURLY {
                continue; // the hourly-aggregator's output is mapped instead
            }
            match map_measurement(m, &self.0.table, &self.0.settings) {
                Ok(resources) => {
                    self.0
                        .emit(
                            input,
                            &m.context,
                            &m.measurement_id,
                            resources,
                            m.provider_modified_at.unwrap_or(0),
                            out,
                        )
                        .await?
                }
                Err(e) => out.dead_letter(input, "mapping", e.to_string()).await?,
            }
        }
        Ok(())
    }
}

/// Maps hourly aggregates.
#[derive(Debug, Clone)]
pub struct AggregateMapper(pub Arc<MapperCore>);

impl Processor for AggregateMapper {
    type In = HourlyAggregate;
    type Change = ();

    async fn process(
        &mut self,
        batch: &[Input<HourlyAggregate>],
        out: &mut Emitter,
    ) -> Result<(), StageError> {
        for input in batch {
            let a = &input.value;
            match map_aggregate(a, &self.0.table, &self.0.settings) {
                Ok(resources) => {
                    self.0
                        .emit(
                            input,
                            &a.context,
                            &a.aggregate_id,
                            resources,
                            a.revision,
                            out,
                        )
                        .await?
                }
                Err(e) => out.dead_letter(input, "mapping", e.to_string()).await?,
            }
        }
        Ok(())
    }
}
