//! Maps Measurements and HourlyAggregates to validated FHIR R5 resources, or R4 for targets
//! that speak R4.

pub mod devices;
pub mod map;
pub mod mapping;
pub mod r4;
pub mod report;
pub mod shapes;
pub mod stage;
pub mod validate;
