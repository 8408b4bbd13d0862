//! Maps Measurements and HourlyAggregates to validated FHIR R5 resources.

pub mod devices;
pub mod map;
pub mod mapping;
pub mod shapes;
pub mod stage;
pub mod validate;
